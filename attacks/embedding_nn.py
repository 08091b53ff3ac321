"""Nearest-embedding inversion of captured activations.

Threat model: an honest-but-curious receiver of activations -- split learning's server
(cut-layer activations ``act``), PrivateLoRA's cloud (the token embeddings a device
uploads, ``embed``), a PC-MoE expert host (the hidden states routed to its experts,
``expert_fwd``) -- that knows the shared starting checkpoint, hence the token embedding
matrix ``E``.  Each captured vector is mapped to the vocabulary token whose embedding
is nearest (cosine or L2), after the normalisation the site applies, if any.

Where the captured vector *is* an embedding row (split learning cut at the embeddings,
``cut_layer: 0``; PrivateLoRA's upload, frozen embeddings) the lookup is exact while the
party's embeddings stay near the checkpoint; deeper sites keep the token's embedding in
the residual stream, so the lookup is a baseline the white-box and learned inverters
must beat.  This is the "embedding inversion" baseline of Song & Raghunathan,
"Information Leakage in Embedding Models", CCS 2020, https://arxiv.org/abs/2004.00053,
and the first step of every split-learning inversion (e.g. Chen et al., BiSR, CCS 2024,
https://arxiv.org/abs/2409.00960).

Sites and the table compared against (``norm: auto``):

* ``split`` ``act`` at ``cut_layer`` k: ``E`` (k = 0 exact; k > 0 the residual stream);
* ``privatelora`` ``embed``: ``E`` (training passes only: they are the batches in truth/);
* ``pcmoe`` ``expert_fwd`` at layer l: ``post_attention_layernorm_l(E)`` (the expert
  input is that norm of the residual); scored as sets (no positions on the wire).

    python -m attacks run runs/<split run> --attack embedding-nn
"""
import logging

import torch

from parties import layers as L
from testbed.errors import ConfigError

from .base import Attack, ThreatModel
from .inversion_common import (attacker_model, candidate_ids, captures, moe_reconstruction, nearest,
                               sequence_reconstructions)

log = logging.getLogger(__name__)


def embedding_table(model, protocol, layer, norm):
    """The vectors captured states are compared with: the embedding matrix, through the
    site's normalisation when ``norm`` is ``auto`` and the site has one."""
    emb = L.base(model).embed_tokens.weight.detach().float()
    if norm == "auto" and protocol == "pcmoe":
        with torch.no_grad():
            return L.base(model).layers[layer].post_attention_layernorm(emb)
    return emb


class EmbeddingNN(Attack):
    """Each captured vector -> the token with the nearest (normalised) embedding."""

    name = "embedding-nn"
    threat_model = ThreatModel(
        observers=("server", "cloud", "party-*", "wire"),
        knowledge=frozenset({"config", "tokenizer", "init_model"}),
        summary="receiver of activations (split server, PrivateLoRA cloud, PC-MoE expert host); "
                "knows the starting checkpoint's embedding matrix")
    targets = {"split": ("act",), "privatelora": ("embed",), "privatelora_full": ("embed",),
               "pcmoe": ("expert_fwd",)}
    options = {"metric": "cosine", "norm": "auto", "steps": None, "max_batches": 0}

    def run(self, view, metric="cosine", norm="auto", steps=None, max_batches=0):
        """``metric``: ``cosine`` or ``l2``; ``norm``: ``auto`` (the site's normalisation) or
        ``none``; ``steps``/``max_batches``: which captured batches to attack."""
        problems = []
        if metric not in ("cosine", "l2"):
            problems.append(f"metric: expected 'cosine' or 'l2' (got {metric!r})")
        if norm not in ("auto", "none"):
            problems.append(f"norm: expected 'auto' or 'none' (got {norm!r})")
        if problems:
            raise ConfigError(f"attacks.{self.name}.options", problems)
        model = attacker_model(view)
        cand = candidate_ids(view, model.config.vocab_size)
        kind = self.kinds(view.protocol)[0]
        if view.protocol == "pcmoe":
            caps = captures(view, kind, "hidden", steps, max_batches, party_key="origin")
        elif view.protocol == "split":
            caps = captures(view, kind, "act", steps, max_batches)
        else:
            caps = captures(view, kind, "embeddings", steps, max_batches, mode="train")
        tables, out = {}, []
        for cap in caps:
            layer = cap.meta.get("layer", 0)
            if layer not in tables:
                tables[layer] = embedding_table(model, view.protocol, layer, norm)[cand]
            flat = cap.states.reshape(-1, cap.states.shape[-1])
            idx, score = nearest(flat, tables[layer], metric)
            ids = cand[idx]
            extra = {"metric": metric, "mean_score": float(score.mean()) if len(score) else None}
            if view.protocol == "pcmoe":
                out.append(moe_reconstruction(cap, ids, **extra))
            else:
                out += sequence_reconstructions(cap, ids.view(cap.states.shape[:-1]), **extra)
        return out


ATTACK = EmbeddingNN
