"""Canaries in the traffic: the windows that carry each planted secret into the first batches.

The generator (:mod:`parties.data.generator`) plants each canary's sentence in some
records.  Left there, a canary reaches the wire only if the sampler happens to draw one
of the few packed rows that hold its whole value -- on the tiny scenarios that almost
never happens, and an attack on the captured steps then has no secret to recover.

With ``data.canaries.placement: traffic`` (the default) every canary whose record a
party trains on is also cut out as one ``training.seq_len`` window of that record (the
value whole, centred when the record allows) and the party's first batches open with
these windows: window ``j`` is row ``j % batch_size`` of the party's batch
``j // batch_size``.  The windows are genuine text of the party's own record, so the
training data is unchanged in kind; only the order puts the secret where the captured,
attacked steps (every attack covers step 0) will carry it.

Each canary dict gains ``token_ids`` (the value's tokens as they are encoded in the
record) and ``planted`` ([{"party", "batch", "row"}]); :func:`testbed.rundir.canary_hits`
uses ``token_ids`` to mark, in ``truth/tokens.jsonl``, which rows carry which canary.
"""
import logging
from weakref import WeakKeyDictionary

import torch

from .tokenizer import EOS_ID

log = logging.getLogger(__name__)


def value_span(tok, text, value):
    """(token ids of ``text``, [start, end) of the tokens covering ``value``'s first
    occurrence) -- ``None`` for the span when ``value`` is not in ``text``."""
    enc = tok.encode(text, add_special_tokens=False)
    ids = list(enc.ids) + [EOS_ID]
    a = text.find(value)
    if a < 0:
        return ids, None
    b = a + len(value)
    toks = [i for i, (s, e) in enumerate(enc.offsets) if e > a and s < b]
    return ids, (toks[0], toks[-1] + 1)


def window(ids, span, seq_len):
    """A ``seq_len`` slice of ``ids`` holding ``span`` whole (centred when possible);
    ``None`` when the span is longer than ``seq_len`` or the record shorter."""
    s, e = span
    if e - s > seq_len or len(ids) < seq_len:
        return None
    start = max(0, min(s - (seq_len - (e - s)) // 2, len(ids) - seq_len))
    return start, ids[start:start + seq_len]


def plan(canaries, records, parties, tok, seq_len, batch_size, placement="traffic"):
    """Annotate ``canaries`` (token_ids, planted) and give each party its opening rows.

    ``records``: every record (``id``, ``text``); ``parties``: :class:`PartyData` with
    ``record_ids`` (the records it trains on).  With ``placement`` ``records`` nothing is
    planted in batches (the canaries stay where the generator put them)."""
    by_id = {r["id"]: r for r in records}
    windows = {p.name: [] for p in parties}
    for c in canaries:
        c.setdefault("planted", [])
        for rid in c["record_ids"]:
            ids, span = value_span(tok, by_id[rid]["text"], c["value"])
            if span is None:
                continue
            c.setdefault("token_ids", ids[span[0]:span[1]])
            holder = next((p for p in parties if rid in p.record_ids), None)
            if placement != "traffic" or holder is None:
                continue
            if any(x["party"] == holder.name for x in c["planted"]):
                continue  # one window per canary and party is enough to put it on the wire
            w = window(ids, span, seq_len)
            if w is None:
                log.warning("canary %s: value spans %d tokens, more than training.seq_len %d; "
                            "not planted in a batch", c["id"], span[1] - span[0], seq_len)
                continue
            j = len(windows[holder.name])
            windows[holder.name].append(w[1])
            c["planted"].append({"party": holder.name, "batch": j // batch_size, "row": j % batch_size})
    for p in parties:
        if windows[p.name]:
            p.planted = CanaryRows(torch.tensor(windows[p.name], dtype=torch.int64), batch_size)
    return canaries


class CanaryRows:
    """The windows that open one party's first batches, counted per sampling generator
    (each protocol of a run draws with its own generator, so each starts at batch 0)."""

    def __init__(self, rows, batch_size):
        self.rows, self.batch_size = rows, batch_size
        self._drawn = WeakKeyDictionary()

    def apply(self, batch, gen):
        """``batch`` with its first rows replaced by the windows due at this draw of ``gen``."""
        k = self._drawn.get(gen, 0)
        self._drawn[gen] = k + 1
        due = self.rows[k * self.batch_size:(k + 1) * self.batch_size]
        if len(due) == 0:
            return batch
        batch = batch.clone()
        n = min(len(due), len(batch))
        batch[:n] = due[:n]
        return batch
