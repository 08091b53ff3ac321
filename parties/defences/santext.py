"""SanText: token-level text privatization with a metric-DP guarantee, before any protocol.

Yue, Du, Wang, Li, Lin, Huang, "Differential Privacy for Text Analytics via Natural Text
Sanitization", Findings of ACL 2021, https://arxiv.org/abs/2106.01221 (the SanText
mechanism, section 3.2).  Each token ``x`` of a party's *training* rows is replaced by
a token ``y`` drawn from the whole vocabulary with

    Pr[y | x] = exp(-epsilon/2 * d(x, y)) / sum_y' exp(-epsilon/2 * d(x, y'))

where ``d`` is the Euclidean distance between the tokens' embeddings.  For any x, x', y
the ratio ``Pr[y | x] / Pr[y | x']`` is at most ``exp(epsilon * d(x, x'))``: the
mechanism is epsilon·d-private (metric local differential privacy, Chatzikokolakis et al.
2013), token by token; :func:`privacy_loss` computes the worst ratio of a table for the
tests.  The embedding space is the shared starting checkpoint's input embedding table
(public: every party and the observers hold it).  A random-init checkpoint's table gives
distances without meaning, so the utility cost is then the price of near-uniform noise;
with a pre-trained base, neighbours are tokens the model treats alike.

Held-out rows stay as they are (they measure utility on real text); canaries in
training rows go through the mechanism like any text.  The private ground truth in
``truth/`` keeps the original tokens, so attacks are scored against what the party
actually wrote (:func:`apply`).
"""
import logging

import torch

log = logging.getLogger(__name__)

# tokens (special ids) the mechanism leaves alone: padding, unknown, end-of-sequence
KEEP_DEFAULT = (0, 1, 2)


def distances(emb):
    """[V, d] embedding table -> [V, V] Euclidean distances (float64)."""
    e = emb.detach().double()
    return torch.cdist(e, e)


def probabilities(dist, epsilon):
    """Row x holds Pr[y | x] for every y: softmax of ``-epsilon/2 * d(x, y)`` over y."""
    return torch.softmax(-0.5 * epsilon * dist, dim=1)


def privacy_loss(probs, dist):
    """max over x != x', y of ``log(Pr[y|x] / Pr[y|x']) / d(x, x')``: at most epsilon."""
    logp = probs.log()
    ratio = (logp.unsqueeze(1) - logp.unsqueeze(0)).amax(dim=2)   # [x, x']
    off = ~torch.eye(len(dist), dtype=torch.bool)
    return float((ratio[off] / dist[off].clamp_min(1e-300)).max())


class SanText:
    """The mechanism for one embedding table and epsilon; ``keep``: ids never replaced."""

    def __init__(self, emb, epsilon, keep=KEEP_DEFAULT):
        self.epsilon = epsilon
        self.dist = distances(emb)
        self.probs = probabilities(self.dist, epsilon)
        self.keep = torch.tensor(sorted(keep), dtype=torch.int64)

    def __call__(self, ids, gen):
        """``ids`` (any shape, int64) with every token not in ``keep`` resampled (``gen``)."""
        flat = ids.reshape(-1)
        out = torch.multinomial(self.probs[flat].float(), 1, generator=gen).reshape(-1)
        kept = torch.isin(flat, self.keep)
        out[kept] = flat[kept]
        return out.reshape(ids.shape)

    def stay_probability(self):
        """Mean over the vocabulary of Pr[y = x | x]: how much text survives, on average."""
        return float(self.probs.diagonal().mean())


def santext_config(scenario):
    entries = [d for d in scenario.defences if d.type == "santext"]
    if len(entries) > 1:
        from testbed.errors import ConfigError
        raise ConfigError("defences", [f"only one santext entry is allowed (got {len(entries)})"])
    return entries[0] if entries else None


def apply(scenario, data, init_model):
    """Privatize every party's training rows in place (``data.parties[i].train``), keeping the
    originals in ``.original`` for the ground truth.  Returns a dict of what was done, or
    None when the scenario has no santext defence."""
    cfg = santext_config(scenario)
    if cfg is None:
        return None
    mech = SanText(init_model.get_input_embeddings().weight, cfg.epsilon)
    changed = total = 0
    for i, party in enumerate(data.parties):
        gen = torch.Generator().manual_seed(scenario.seed * 1_000_003 + 7919 * (i + 1))
        original = party.train
        party.train = mech(original, gen)
        party.original = original
        changed += int((party.train != original).sum())
        total += original.numel()
        if getattr(party, "planted", None) is not None:   # canary windows are text like any other
            party.planted_original = party.planted.rows
            party.planted.rows = mech(party.planted.rows, gen)
    info = {"epsilon": cfg.epsilon, "tokens": total, "replaced": changed,
            "replaced_fraction": changed / total if total else 0.0,
            "expected_stay_probability": mech.stay_probability()}
    log.info("santext epsilon=%s: %d of %d training tokens replaced", cfg.epsilon, changed, total)
    return info


def original_rows(parties):
    """``record_truth`` filter: (party name, rows it trained on) -> the rows the party wrote.
    A protocol records the (privatized) rows it trained on; the ground truth must hold the
    party's own text.  Lazy: a party's data is read only when that party records truth
    (in a container, only the party's own shard is there)."""
    maps = {}

    def to_original(party, ids):
        if party not in maps:
            data = parties[int(str(party).rsplit("-", 1)[1])]
            orig = getattr(data, "original", None)
            pairs = [] if orig is None else list(zip(data.train, orig))
            if getattr(data, "planted_original", None) is not None:
                pairs += list(zip(data.planted.rows, data.planted_original))
            maps[party] = {row.numpy().tobytes(): o for row, o in pairs} if pairs else None
        table = maps[party]
        if table is None:
            return ids
        return torch.stack([table.get(row.cpu().numpy().tobytes(), row) for row in ids])
    return to_original
