"""PrivateLoRA M-recovery, then token recovery from the low-rank activations.

Wang et al., "PrivateLoRA For Efficient Privacy Preserving LLM", arXiv 2311.14030,
https://arxiv.org/abs/2311.14030 ; the protocol is :mod:`parties.privatelora`.

Threat model: the honest-but-curious cloud.  For every token of every pass, in every
layer and for each of q, k, v, it computes ``A·x`` (sent down, ``act_down``) and receives
``M·A·x`` (``act_up``) -- in ``nn.Linear``'s row convention ``(x A) M`` -- and it receives
the token embeddings the device uploads (``embed``).  It knows the shared starting
checkpoint (its own frozen stack; the device's embeddings are frozen too).

1. M.  ``act_up = act_down @ M`` holds for every token of a pass, so once a pass has at
   least ``r`` tokens whose ``A·x`` span the rank-``r`` space, M is the least-squares
   solution -- exact up to float rounding (per pass, layer and projection).  M is the
   device's whole trainable state: with the cloud's own A and B it gives the device's
   fine-tuned weight delta ``ΔW = A M B`` for every adapted projection, i.e. the
   device's fine-tuned model (embeddings and head are the public checkpoint's).
2. Tokens.  Layer 0's input is ``x = RMSNorm(embedding(token))``: position-independent
   (RoPE acts after the projection), so ``x A`` of layer 0 identifies the token.  The
   cloud holds A; the adversary view carries traffic and public knowledge only, so A of
   layer 0 is re-derived by least squares from the cloud's own inputs and outputs
   ``(RMSNorm(embeddings), act_down)`` -- what the cloud computes every pass.  Each
   captured layer-0 ``A·x`` (q, k and v concatenated, 3r numbers per token) is then
   matched to the nearest ``RMSNorm(E_v) A`` over the vocabulary (``tokens_from:
   act_down``); ``tokens_from: embed`` looks the uploaded embeddings up directly (what
   :mod:`attacks.embedding_nn` does).

Only training passes are turned into reconstructions (they are the batches in truth/).

    python -m attacks run runs/<privatelora run> --attack lora-m-recovery
"""
import logging
from dataclasses import dataclass, field

import torch

from parties import layers as L
from parties.privatelora.lowrank import PROJECTIONS
from testbed.errors import ConfigError

from .base import Attack, Reconstruction, ThreatModel
from .inversion_common import attacker_model, candidate_ids, nearest, received

log = logging.getLogger(__name__)


@dataclass
class LoraPass:
    """One PrivateLoRA pass as the cloud saw it: the uploaded embeddings [B, T, d] and per
    layer ``{q,k,v: A·x}`` and ``{q,k,v: M·A·x}`` ([B, T, r])."""

    party: str
    step: int
    mode: str
    start: int
    embeddings: torch.Tensor
    down: list = field(default_factory=list)
    up: list = field(default_factory=list)
    seq: int = 0


def lora_passes(view, modes=None):
    """Every pass the observer saw, in capture order (a pass starts with its ``embed``).
    ``modes``: keep only these (``train``, ``eval``, ``generate``)."""
    open_pass, out = {}, []
    for m in view.messages(kind=("embed", "act_down", "act_up"), with_tensors=True):
        party = m.meta.get("party") or m.src
        if m.kind == "embed":
            p = LoraPass(party, m.step, m.meta.get("mode"), m.meta.get("position", 0),
                         received(m)["embeddings"], seq=m.seq)
            open_pass[party] = p
            out.append(p)
            continue
        p = open_pass.get(party)
        if p is None:
            continue  # the pass began before the capture (never in an embedded run)
        side = p.down if m.kind == "act_down" else p.up
        if m.meta.get("layer") != len(side):
            raise ValueError(f"capture seq {m.seq}: {m.kind} for layer {m.meta.get('layer')} "
                             f"out of order (expected layer {len(side)})")
        side.append({k: v for k, v in received(m).items() if k in PROJECTIONS})
    return [p for p in out if modes is None or p.mode in modes]


def solve_m(down, up):
    """Least-squares M with ``up ~ down @ M`` from [..., r] tensors -> (M [r, r'] float64,
    relative residual, rank of ``down``)."""
    a = down.reshape(-1, down.shape[-1]).double()
    b = up.reshape(-1, up.shape[-1]).double()
    m = torch.linalg.lstsq(a, b, driver="gelsd").solution
    norm = float(b.norm())
    res = float((a @ m - b).norm()) / norm if norm > 0 else float((a @ m - b).norm())
    return m, res, int(torch.linalg.matrix_rank(a))


def recover_m(passes):
    """M per pass, layer and projection -> list of ``{"party", "step", "mode", "seq", "M":
    [{p: M}], "residual": max relative residual, "rank": min rank of A·x}``."""
    out = []
    for p in passes:
        ms, worst, rank = [], 0.0, None
        for down, up in zip(p.down, p.up):
            layer = {}
            for name in PROJECTIONS:
                m, res, r = solve_m(down[name], up[name])
                layer[name] = m
                worst, rank = max(worst, res), r if rank is None else min(rank, r)
            ms.append(layer)
        out.append({"party": p.party, "step": p.step, "mode": p.mode, "seq": p.seq, "M": ms,
                    "residual": worst, "rank": rank})
    return out


def recover_a(model, passes, layer=0):
    """The cloud's A of ``layer`` per projection, from ``(x, A·x)`` pairs it computed:
    x = the layer's input norm over the uploaded embeddings through an unadapted stack
    (exact for layer 0 in every pass; for deeper layers only passes whose ``M·A·x`` are
    all zero, i.e. M = 0, are used).  -> ({p: A [d, r] float64}, rank of the x used)."""
    xs, ys = [], {name: [] for name in PROJECTIONS}
    for p in passes:
        if layer >= len(p.down):
            continue
        if layer > 0 and (p.start != 0 or any(float(t.abs().max()) > 0 for u in p.up[:layer]
                                              for t in u.values())):
            continue
        with torch.no_grad():
            h = L.run_blocks(model, p.embeddings, 0, layer) if layer else p.embeddings
            x = L.base(model).layers[layer].input_layernorm(h)
        xs.append(x.reshape(-1, x.shape[-1]).double())
        for name in PROJECTIONS:
            ys[name].append(p.down[layer][name].reshape(-1, p.down[layer][name].shape[-1]).double())
    if not xs:
        raise ValueError(f"no pass lets the cloud recompute layer {layer}'s input (need M = 0 for layer > 0)")
    x = torch.cat(xs)
    return ({name: torch.linalg.lstsq(x, torch.cat(ys[name]), driver="gelsd").solution for name in PROJECTIONS},
            int(torch.linalg.matrix_rank(x)))


def layer0_codes(model, a, ids):
    """What layer 0's ``A·x`` is for each token id in ``ids``: q, k, v concatenated [n, 3r]."""
    with torch.no_grad():
        x = L.base(model).layers[0].input_layernorm(L.base(model).embed_tokens(ids)).double()
    return torch.cat([x @ a[name] for name in PROJECTIONS], -1)


class LoraMRecovery(Attack):
    """Least-squares M from (A·x, M·A·x); tokens from layer 0's A·x (or the uploads)."""

    name = "lora-m-recovery"
    threat_model = ThreatModel(
        observers=("cloud", "wire"),
        knowledge=frozenset({"config", "tokenizer", "init_model"}),
        summary="PrivateLoRA cloud: computes A·x, receives M·A·x and the uploaded embeddings; "
                "knows its frozen stack (the starting checkpoint)")
    targets = {"privatelora": ("embed", "act_up")}
    options = {"tokens_from": "act_down", "keep_m": False, "steps": None, "max_batches": 0}

    def run(self, view, tokens_from="act_down", keep_m=False, steps=None, max_batches=0):
        """``tokens_from``: ``act_down`` (layer 0's A·x) or ``embed`` (the uploads);
        ``keep_m``: store each recovered M (as nested lists) in the first row's meta."""
        if tokens_from not in ("act_down", "embed"):
            raise ConfigError(f"attacks.{self.name}.options",
                              [f"tokens_from: expected 'act_down' or 'embed' (got {tokens_from!r})"])
        model = attacker_model(view)
        cand = candidate_ids(view, model.config.vocab_size)
        passes = lora_passes(view)
        train = [p for p in passes if p.mode == "train" and (steps is None or p.step in steps)]
        if max_batches:
            train = train[:max_batches]
        ms = {m["seq"]: m for m in recover_m(train)}
        if tokens_from == "act_down":
            a0, rank = recover_a(model, passes, 0)
            table = layer0_codes(model, a0, cand)
        else:
            table, rank = L.base(model).embed_tokens.weight.detach()[cand], None
        out = []
        for p in train:
            if tokens_from == "act_down":
                codes = torch.cat([p.down[0][name].double() for name in PROJECTIONS], -1)
            else:
                codes = p.embeddings
            idx, _ = nearest(codes.reshape(-1, codes.shape[-1]), table, "l2")
            ids = cand[idx].view(p.embeddings.shape[:-1])
            m = ms[p.seq]
            meta = {"tokens_from": tokens_from, "m_residual": m["residual"], "m_rank": m["rank"],
                    "m_norm": max(float(t.norm()) for layer in m["M"] for t in layer.values()),
                    "a_rank": rank}
            if m["rank"] < p.down[0]["q"].shape[-1]:
                meta["note"] = "fewer independent tokens than the rank in a pass: M is not determined"
            if rank is not None and rank < model.config.hidden_size:
                meta["note"] = (f"A re-derived from rank-{rank} inputs (< hidden {model.config.hidden_size}): "
                                "tokens never uploaded may be mismatched")
            for b, row in enumerate(ids.tolist()):
                rec = Reconstruction(view.protocol, p.party, p.step, row, row=b, meta=dict(meta))
                if keep_m and b == 0:
                    rec.meta["M"] = [{k: t.tolist() for k, t in layer.items()} for layer in m["M"]]
                out.append(rec)
        return out


ATTACK = LoraMRecovery
