"""Routing-trace inversion: tokens from the experts chosen for them, nothing else.

Cf. the expert-choice leakage studied in arXiv 2602.04105 (routing decisions of a
mixture of experts as a side channel on the input tokens).

Threat model: a PC-MoE expert host (party-j) that uses only *which* of its experts each
of party-i's routed tokens was sent to -- the message meta ``layer``, ``experts``,
``counts`` -- not the hidden states' values.  The only use of the tensor is to tell that
two rows are the same token (a token whose top-k picks two experts of this host is sent
once per expert, with identical hidden states; ``pair_rows``), which a host learns from
equality alone -- or, with PC-MoE's ``dedup_rows``, from the ``row_index`` tensor that
names each row's experts.  It knows the starting checkpoint (routers included: the owner's router
starts there) and has public text of the same domain.

Attack.  Pass the auxiliary text through the attacker's copy of the checkpoint; at each
MoE layer take the routers' top-k experts per token and keep what party-j would see:
the chosen experts it hosts (tokens that choose none of them never reach it).  A
classifier from that observation to the token -- here the frequency table, which is the
Bayes-optimal classifier for a discrete feature -- predicts, for every captured row,
the most frequent auxiliary token with the same observation at the same layer.  The
messages give no positions and cannot link a token's rows across layers, so the feature
is one layer's visible choice: with E experts, top-k and n parties there are only a
handful of distinct observations, and accuracy is expected to be low (reported, not
assumed).  Scored as sets, like every PC-MoE attack (no positions on the wire).

    python -m attacks run runs/<pcmoe run> --attack routing-trace
"""
import logging
from collections import Counter, defaultdict


from parties import layers as L
from parties.pcmoe.sharding import hosted_experts

from .base import Attack, ThreatModel
from .inversion_common import attacker_model, aux_rows, batched, captures, moe_inputs, moe_reconstruction

log = logging.getLogger(__name__)


def topk_experts(model, ids, layer):
    """The router's top-k expert ids per token of ``ids`` [N, T] at ``layer`` -> [N*T, k]."""
    def fn(chunk):
        x = moe_inputs(model, chunk, layer)
        _, _, top = L.base(model).layers[layer].mlp.gate(x.reshape(-1, x.shape[-1]))
        return top.view(chunk.shape[0], chunk.shape[1], -1)
    return batched(fn, ids).reshape(-1, model.config.num_experts_per_tok)


def fit_table(model, aux, layer, hosted):
    """observation (sorted tuple of hosted experts chosen) -> Counter of aux tokens."""
    top = topk_experts(model, aux, layer).tolist()
    table = defaultdict(Counter)
    for tok, chosen in zip(aux.reshape(-1).tolist(), top):
        seen = tuple(sorted(set(chosen) & hosted))
        if seen:
            table[seen][tok] += 1
    return table


def observations(cap, pair_rows):
    """The visible observation of every received row, in message order: the experts of
    this message the row's token went to (rows with identical hidden states in two
    experts' blocks are one token, with ``pair_rows``; with a ``row_index`` -- one row per
    token -- each row's experts are the blocks that point at it)."""
    experts, counts = cap.meta["experts"], cap.meta["counts"]
    owner = [e for e, c in zip(experts, counts) for _ in range(c)]
    index = cap.extra.get("row_index") if cap.extra else None
    if index is not None:
        seen = [set() for _ in range(len(cap.states))]
        for e, row in zip(owner, index.tolist()):
            seen[row].add(e)
        return [tuple(sorted(s)) for s in seen]
    seen = [{e} for e in owner]
    if pair_rows:
        first = {}
        for i, row in enumerate(cap.states):
            key = row.numpy().tobytes()
            if key in first and owner[first[key]] != owner[i]:
                j = first[key]
                seen[i] = seen[j] = seen[j] | {owner[i]}
            first.setdefault(key, i)
    return [tuple(sorted(s)) for s in seen]


class RoutingTrace(Attack):
    """Expert choices (per layer, as the host sees them) -> most likely token."""

    name = "routing-trace"
    threat_model = ThreatModel(
        observers=("party-*",),
        knowledge=frozenset({"config", "tokenizer", "init_model", "aux_text"}),
        summary="PC-MoE expert host using only which of its experts each routed token chose "
                "(message meta), the starting checkpoint's routers and public text")
    targets = {"pcmoe": ("expert_fwd",)}
    options = {"pair_rows": True, "aux_records": 300, "layer": None, "steps": None, "max_batches": 0}

    def run(self, view, pair_rows=True, aux_records=300, layer=None, steps=None, max_batches=0):
        """``pair_rows``: join a token's rows sent to two of this host's experts; ``layer``:
        only that layer's messages (default: every layer); ``steps``/``max_batches``: which
        captured batches to attack."""
        model = attacker_model(view)
        cfg = view.config()
        n_parties = cfg["parties"]["count"]
        me = int(view.observer.rsplit("-", 1)[1])
        hosted = set(hosted_experts(model.config.num_local_experts, me, n_parties))
        aux = aux_rows(view, cfg["training"]["seq_len"], aux_records)
        caps = captures(view, "expert_fwd", "hidden", steps, max_batches, party_key="origin", host=view.observer)
        tables, out = {}, []
        for cap in caps:
            lay = int(cap.meta["layer"])
            if layer is not None and lay != layer:
                continue
            if lay not in tables:
                tables[lay] = fit_table(model, aux, lay, hosted)
                log.info("routing-trace layer %d: %d distinct observations", lay, len(tables[lay]))
            obs = observations(cap, pair_rows)
            guess = [tables[lay][o].most_common(1)[0][0] if tables[lay][o] else 0 for o in obs]
            out.append(moe_reconstruction(cap, guess, observations=[list(o) for o in obs],
                                          distinct_observations=len(tables[lay])))
        return out


ATTACK = RoutingTrace
