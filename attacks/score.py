"""The scorer: the only code under attacks/ that reads ``truth/``.

``score(run_dir, reconstructions)`` aligns each reconstruction with the private batch it
claims to recover -- ``(protocol, party, step)`` from ``truth/tokens.jsonl`` -- and with a
row of that batch (the attack's ``row``, or, when the attack cannot know the order, the
row it matches best, each row used once).  Metrics, over every row of every attacked batch
(a row nothing was matched to scores 0):

* ``token_accuracy``  -- position-wise: matching tokens / truth length;
* ``rouge1/2/L``      -- F-measure of the ``rouge-score`` package on decoded text;
* ``exact_match``     -- fraction of rows recovered token for token;
* ``canary_recovery`` -- planted secrets recovered / secrets present in attacked rows.
  Where a row carries a canary comes from ``truth/tokens.jsonl`` (``canaries``: row and
  token positions; computed from ``truth/canaries.json`` for runs that lack it).  A
  canary counts as recovered when the reconstruction matched to its row has the value's
  tokens at their positions, or its decoded text contains the value, or the value is
  among the attack's reported ``secrets`` for that batch.  ``canary_rows`` lists every
  (party, step, row, canary) present and whether it was recovered;
* routed reconstructions (``kind="routed"``: PC-MoE, one predicted token per row an
  expert host received) are placed at their positions by ``truth/routes.jsonl`` and
  scored per (batch, layer) with the sequence metrics above, plus ``routed_accuracy``
  (over the received rows) and ``by_layer``; see :mod:`attacks.score_routed`.  Their
  token sets are scored too, as an extra;
* set-valued reconstructions (``kind="set"``) score ``token_set_recall`` /
  ``token_set_precision`` against the tokens present anywhere in the batch, and
  ``token_set_exact`` (the sets are equal).
"""
import json
from pathlib import Path

from parties.data.tokenizer import decode_ids, load_tokenizer
from testbed.rundir import canary_hits, iter_jsonl

from .score_routed import read_routes, score_routed

SEQUENCE_METRICS = ("token_accuracy", "rouge1", "rouge2", "rougeL", "exact_match")
SET_METRICS = ("token_set_recall", "token_set_precision", "token_set_exact")


AGGREGATE = "*"   # a reconstruction of a gradient summed over parties: every party's rows


def read_truth(run_dir):
    """(protocol, party, step) -> list of token-id rows, and the canary list.  Each
    (protocol, step) also has the key (protocol, "*", step): every party's rows of that
    step, in party order -- the batch behind an aggregated gradient."""
    batches, _, canaries = read_truth_hits(run_dir)
    return batches, canaries


def read_truth_hits(run_dir):
    """As :func:`read_truth`, plus (protocol, party, step) -> the canary occurrences of
    that batch (``{"row", "canary", "start", "end"}``)."""
    root = Path(run_dir) / "truth"
    canaries = json.loads((root / "canaries.json").read_text()) if (root / "canaries.json").is_file() else []
    batches, hits = {}, {}
    for rec in iter_jsonl(root / "tokens.jsonl"):
        key = (rec["protocol"], rec["party"], rec["step"])
        batches[key] = rec["input_ids"]
        hits[key] = rec["canaries"] if "canaries" in rec else canary_hits(rec["input_ids"], canaries)
    for (protocol, party, step) in sorted(list(batches), key=str):   # the aggregates, party order
        agg = (protocol, AGGREGATE, step)
        offset = len(batches.get(agg, []))
        batches[agg] = batches.get(agg, []) + batches[(protocol, party, step)]
        hits[agg] = hits.get(agg, []) + [{**h, "row": h["row"] + offset} for h in hits[(protocol, party, step)]]
    return batches, hits, canaries


def token_accuracy(pred, truth):
    """Fraction of truth positions where ``pred`` has the same token."""
    if not truth:
        return 0.0
    return sum(int(p == t) for p, t in zip(pred, truth)) / len(truth)


def _match(recs, rows):
    """Assign sequence reconstructions to truth rows: the attack's row when given, else
    greedily by best token accuracy (each row at most once). -> {rec index: row}."""
    out, used = {}, set()
    for i, r in enumerate(recs):
        if r.row is not None and 0 <= r.row < len(rows) and r.row not in used:
            out[i] = r.row
            used.add(r.row)
    pairs = sorted(((token_accuracy(r.token_ids, rows[j]), -i, j) for i, r in enumerate(recs)
                    if i not in out and r.row is None for j in range(len(rows)) if j not in used),
                   reverse=True)
    for _, neg_i, j in pairs:
        i = -neg_i
        if i in out or j in used:
            continue
        out[i] = j
        used.add(j)
    return out


class Scorer:
    """Scores reconstructions of one run; reads truth/ and public/tokenizer.json."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.batches, self.hits, self.canaries = read_truth_hits(run_dir)
        self.routes = read_routes(self.run_dir / "truth")
        self._by_id = {c["id"]: c for c in self.canaries}
        self.tok = load_tokenizer(self.run_dir / "public" / "tokenizer.json")
        from rouge_score import rouge_scorer
        self.rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)

    def decode(self, ids):
        return decode_ids(self.tok, ids)

    def score(self, reconstructions):
        """-> (summary dict, one dict per reconstruction with its own scores and text)."""
        by_batch = {}
        for r in reconstructions:
            by_batch.setdefault(r.batch, []).append(r)
        per_rec, rows_scored, sets_scored, canary_rows = [], [], [], []
        layers = {}   # routed reconstructions: layer -> [correct, received, row scores]
        steps = {}    # training step -> row scores (leakage over training)
        unknown = 0
        for key, recs in by_batch.items():
            rows = self.batches.get(key)
            if rows is None:
                unknown += 1
                per_rec += [{**r.to_json(), "text": self.decode(r.token_ids), "matched_row": None,
                             "note": "no such batch in truth/"} for r in recs]
                continue
            routed = [r for r in recs if r.kind == "routed"]
            if routed:
                entries, scored, found, lay = score_routed(self, key, routed, rows, [self.decode(x) for x in rows],
                                                           self.hits.get(key, []), self._by_id)
                per_rec += entries
                sets_scored += [e for e in entries if SET_METRICS[0] in e]
                rows_scored += scored
                steps.setdefault(key[2], []).extend(scored)
                canary_rows += found
                for k, (c, n, s) in lay.items():
                    acc = layers.setdefault(k, [0, 0, []])
                    acc[0], acc[1], acc[2] = acc[0] + c, acc[1] + n, acc[2] + s
                recs = [r for r in recs if r.kind != "routed"]
                if not recs:
                    continue
            seqs = [r for r in recs if r.kind == "sequence"]
            match = _match(seqs, rows)
            row_of = {id(seqs[i]): j for i, j in match.items()}
            secrets = " | ".join(s for r in recs for s in r.secrets)
            truth_text = [self.decode(row) for row in rows]
            row_entry = [None] * len(rows)
            for r in recs:
                entry = {**r.to_json(), "text": self.decode(r.token_ids)}
                if r.kind == "set":
                    entry.update(self._set_scores(r.token_ids, rows))
                    sets_scored.append(entry)
                else:
                    j = row_of.get(id(r))
                    entry["matched_row"] = j
                    if j is not None:
                        row_entry[j] = entry
                        entry.update(self._seq_scores(r.token_ids, rows[j], entry["text"], truth_text[j]))
                per_rec.append(entry)
            if seqs:
                scored = [e or dict.fromkeys(SEQUENCE_METRICS, 0.0) for e in row_entry]
                rows_scored += scored
                steps.setdefault(key[2], []).extend(scored)
            if seqs or secrets:
                canary_rows += self._canaries(key, rows, truth_text, row_entry, secrets)
        summary = {"reconstructions": len(reconstructions), "batches": len(by_batch) - unknown,
                   "unknown_batches": unknown}
        if rows_scored:
            summary["rows"] = len(rows_scored)
            for m in SEQUENCE_METRICS:
                summary[m] = sum(float(e[m]) for e in rows_scored) / len(rows_scored)
        if layers:
            summary["routed_accuracy"] = sum(c for c, _, _ in layers.values()) / max(
                1, sum(n for _, n, _ in layers.values()))
            summary["by_layer"] = {str(k): {"routed_accuracy": c / n if n else 0.0, "received": n, "rows": len(s),
                                            **{m: sum(float(e[m]) for e in s) / len(s) for m in SEQUENCE_METRICS}}
                                   for k, (c, n, s) in sorted(layers.items(), key=lambda kv: str(kv[0]))}
        if len(steps) > 1:
            summary["by_step"] = {str(k): {"rows": len(v), **{m: sum(float(e[m]) for e in v) / len(v)
                                                              for m in SEQUENCE_METRICS}}
                                  for k, v in sorted(steps.items())}
        if rows_scored or any(r.secrets for r in reconstructions):
            found = sum(c["recovered"] for c in canary_rows)
            summary["canaries_present"] = len(canary_rows)
            summary["canary_recovery"] = found / len(canary_rows) if canary_rows else None
            summary["canary_rows"] = canary_rows
        if sets_scored:
            for m in SET_METRICS:
                summary[m] = sum(float(e[m]) for e in sets_scored) / len(sets_scored)
        return summary, per_rec

    def _canaries(self, key, rows, truth_text, row_entry, secrets):
        """One dict per canary occurrence in the batch ``key``: where, and whether recovered."""
        out, seen = [], set()
        for h in self.hits.get(key, []):
            c, j = self._by_id.get(h["canary"]), h["row"]
            if c is None or j >= len(rows):
                continue
            seen.add((c["id"], j))
            e = row_entry[j]
            pred = e["token_ids"] if e else []
            at_pos = len(pred) >= h["end"] and pred[h["start"]:h["end"]] == rows[j][h["start"]:h["end"]]
            found = at_pos or (e is not None and c["value"] in e["text"]) or c["value"] in secrets
            out.append({"party": key[1], "step": key[2], "row": j, "canary": c["id"],
                        "start": h["start"], "end": h["end"], "recovered": bool(found)})
        # Canaries without token positions (data not generated here): by decoded text.
        for c in self.canaries:
            for j, text in enumerate(truth_text):
                if (c["id"], j) in seen or c.get("token_ids") or c["value"] not in text:
                    continue
                pred = row_entry[j]["text"] if row_entry[j] else ""
                out.append({"party": key[1], "step": key[2], "row": j, "canary": c["id"],
                            "recovered": c["value"] in pred or c["value"] in secrets})
        return out

    def _seq_scores(self, pred, truth, pred_text, truth_text):
        r = self.rouge.score(truth_text, pred_text)
        return {"token_accuracy": token_accuracy(pred, truth),
                "exact_match": float(list(pred) == list(truth)),
                "rouge1": r["rouge1"].fmeasure, "rouge2": r["rouge2"].fmeasure, "rougeL": r["rougeL"].fmeasure}

    @staticmethod
    def _set_scores(pred, rows):
        truth = {t for row in rows for t in row}
        pred = set(pred)
        hit = len(pred & truth)
        return {"token_set_recall": hit / len(truth) if truth else 0.0,
                "token_set_precision": hit / len(pred) if pred else 0.0,
                "token_set_exact": float(pred == truth)}


def score(run_dir, reconstructions):
    """Convenience: ``Scorer(run_dir).score(reconstructions)``."""
    return Scorer(run_dir).score(reconstructions)
