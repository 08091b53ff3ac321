"""Per-position scoring of PC-MoE reconstructions (part of the scorer; reads ``truth/``).

An expert host receives rows (hidden states) with no token positions; an attack on them
reports one predicted token per received row, in message order (a ``routed``
:class:`~attacks.base.Reconstruction` with ``meta.layer`` and ``meta.host``).  The owner
recorded, for each training message, the (batch row, position) of every row it sent
(``truth/routes.jsonl``, :meth:`testbed.rundir.RunDir.route`).  With it each prediction
lands at its position, and the batch is scored like any other protocol's, per (batch,
layer): for every row of the batch a sequence holding the predicted tokens at the
positions the observer received (the rest count as wrong), scored by token accuracy,
ROUGE and exact match; ``routed_accuracy`` is the accuracy over the received rows alone;
a canary counts as recovered when every token of its value was received and predicted.

Two PC-MoE hiding options leave marks in the truth: a dummy row (``pad_counts``) is
recorded at ``[-1, -1]`` and its prediction is not scored (it carries no token); with
``eval_traffic: disguised`` evaluation goes as training traffic and the owner records its
routes too, flagged ``eval`` -- the messages of one (party, step, layer, host) are matched
to its records in order (capture ``seq``), and evaluation rows are not scored (truth/
holds the training batches only).
"""
from parties.data.tokenizer import PAD_ID
from testbed.rundir import iter_jsonl


def read_routes(root):
    """(protocol, party, step, layer, host) -> [record, ...] in the order the owner sent
    them; a record is ``{"positions": [[row, pos], ...], "eval": bool}``."""
    out = {}
    for r in iter_jsonl(root / "routes.jsonl"):
        out.setdefault((r["protocol"], r["party"], r["step"], r["layer"], r["host"]), []).append(
            {"positions": r["positions"], "eval": bool(r.get("eval"))})
    return out


def _matched(scorer, key, recs):
    """The route record of each reconstruction (``None``: none): a key's messages in
    capture order take its records in the order they were sent."""
    by_key = {}
    for r in sorted(recs, key=lambda r: (r.meta.get("seq") is None, r.meta.get("seq") or 0)):
        by_key.setdefault(key + (r.meta.get("layer"), r.meta.get("host")), []).append(r)
    out = {}
    for k, got in by_key.items():
        records = scorer.routes.get(k, [])
        for i, r in enumerate(got):
            out[id(r)] = records[i] if i < len(records) else None
    return out


def score_routed(scorer, key, recs, rows, truth_text, hits, canaries):
    """Score the routed reconstructions ``recs`` of batch ``key`` against ``rows``.

    Returns (entries: one dict per reconstruction, with set scores unless it is
    evaluation traffic, row scores: one per (layer, batch row),
    canary rows, per-layer {layer: [correct, received, row scores]})."""
    entries, scored, canary_rows, layers = [], [], [], {}
    by_layer = {}
    matched = _matched(scorer, key, recs)
    for r in recs:
        entry = {**r.to_json(), "text": scorer.decode(r.token_ids)}
        route = matched[id(r)]
        if route is None or not route["eval"]:   # token sets (of every prediction): kept as an extra
            entry.update(scorer._set_scores(r.token_ids, rows))
        pos = None if route is None else route["positions"]
        if pos is None or len(pos) != len(r.token_ids):
            entry["note"] = "no positions in truth/routes.jsonl for this message" if pos is None else \
                f"{len(r.token_ids)} predictions for {len(pos)} routed rows"
        elif route["eval"]:
            entry["note"] = "evaluation traffic sent as training traffic (eval_traffic: disguised): not scored"
        else:
            real = [(t, (b, p)) for t, (b, p) in zip(r.token_ids, pos) if b >= 0]
            if len(real) < len(pos):
                entry["dummy_rows"] = len(pos) - len(real)
            ok = [int(t == rows[b][p]) for t, (b, p) in real]
            entry["routed_accuracy"] = sum(ok) / len(ok) if ok else 0.0
            by_layer.setdefault(r.meta.get("layer"), []).append((real, ok))
        entries.append(entry)
    for layer, got in sorted(by_layer.items(), key=lambda kv: str(kv[0])):
        pred = [[PAD_ID] * len(row) for row in rows]
        seen = [[False] * len(row) for row in rows]
        correct = received = 0
        for real, ok in got:
            for (t, (b, p)), hit in zip(real, ok):
                pred[b][p], seen[b][p] = t, True
                correct, received = correct + hit, received + 1
        row_scores = []
        for b, row in enumerate(rows):
            text = scorer.decode([t for t, s in zip(pred[b], seen[b]) if s])
            row_scores.append(scorer._seq_scores(pred[b], row, text, truth_text[b]))
        scored += row_scores
        layers[layer] = [correct, received, row_scores]
        for h in hits:
            c, b = canaries.get(h["canary"]), h["row"]
            if c is None or b >= len(rows):
                continue
            span = range(h["start"], h["end"])
            found = all(seen[b][p] and pred[b][p] == rows[b][p] for p in span)
            canary_rows.append({"party": key[1], "step": key[2], "layer": layer, "row": b, "canary": c["id"],
                                "start": h["start"], "end": h["end"], "recovered": found,
                                "received": sum(seen[b][p] for p in span)})
    return entries, scored, canary_rows, layers
