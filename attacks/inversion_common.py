"""What the activation-inversion attacks share: captured states, the attacker's copy of the
layers before a cut, public auxiliary rows and nearest-neighbour lookups.

An activation attack compares what an observer received (split learning's cut-layer
activations, PC-MoE's expert inputs, PrivateLoRA's uploaded embeddings and low-rank
projections) with the same quantity computed by its own copy of the shared starting
checkpoint.  This module computes that quantity for each capture *site*:

* ``split``      -- ``act`` = the output of decoder blocks ``0 .. cut-1`` (``cut`` 0: the
  token embeddings), :func:`split_states`;
* ``pcmoe``      -- ``hidden`` = the input of layer ``l``'s experts, i.e. its
  post-attention-norm hidden state, :func:`moe_inputs`;
* ``privatelora``-- ``x`` = layer ``l``'s input-norm hidden state (the cloud sends
  ``x A``), :func:`attention_inputs`.

Captured tensors are read the way their receiver saw them (quantized tensors
dequantized, :func:`received`).
"""
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from parties import layers as L
from parties.data.dataset import pack
from parties.data.tokenizer import EOS_ID, encode_records
from parties.defences import restore
from testbed.engine.codec import Message

log = logging.getLogger(__name__)


@dataclass
class Capture:
    """One captured tensor of private states with what the attack needs to place it.

    ``party``: whose data it encodes; ``step``: the training step (aligns with truth);
    ``states``: ``[B, T, H]`` (sequence sites) or ``[N, H]`` (PC-MoE rows); ``meta``: the
    message meta (layer, experts, counts, ...); ``extra``: the message's other tensors
    (PC-MoE ``dedup_rows``: ``row_index``)."""

    protocol: str
    party: str
    step: int
    states: torch.Tensor
    meta: dict = field(default_factory=dict)
    seq: int = 0
    extra: dict = field(default_factory=dict)


def received(msg):
    """The float tensors of a captured message as its receiver saw them (int8/bf16
    quantization undone, as :func:`parties.defences.restore` does for roles)."""
    raw = Message(kind=msg.kind, src=msg.src, dst=msg.dst, step=msg.step, meta=msg.meta,
                  tensors=msg.tensors())
    return {k: t.float() if t.is_floating_point() else t for k, t in restore(raw).tensors.items()}


def captures(view, kind, name, steps=None, max_batches=0, party_key="party", **meta):
    """Every captured ``kind`` message's tensor ``name`` as a :class:`Capture`, in capture order.

    ``party_key``: the meta key naming the data owner (``origin`` for PC-MoE); messages
    whose owner is not a ``party-*`` role, or is the observer itself (its own data is no
    leak), are skipped.  ``steps``: keep only these steps; ``max_batches``: at most this
    many distinct (party, step) batches (0: all)."""
    out, batches = [], set()
    for m in view.messages(kind=kind, with_tensors=True, **meta):
        party = m.meta.get(party_key) or m.src
        if not str(party).startswith("party-") or party == view.observer \
                or (steps is not None and m.step not in steps):
            continue
        if max_batches and (party, m.step) not in batches and len(batches) >= max_batches:
            continue
        batches.add((party, m.step))
        tensors = received(m)
        out.append(Capture(view.protocol, party, m.step, tensors.pop(name), dict(m.meta), m.seq, tensors))
    return out


def attacker_model(view):
    """The shared starting checkpoint, float32, eval mode, eager experts (for MoE)."""
    model = view.init_model().float().eval()
    if hasattr(model, "set_experts_implementation") and getattr(model.config, "num_local_experts", None):
        model.set_experts_implementation("eager")
    return model


def split_states(model, ids, cut, embeds=None):
    """Split learning's cut activation for ``ids`` [B, T] (or ``embeds`` [B, T, H]):
    blocks ``0 .. cut-1`` over the token embeddings -> [B, T, H]."""
    h = L.run_embed(model, ids) if embeds is None else embeds
    return L.run_blocks(model, h, 0, cut)


def moe_inputs(model, ids, layer):
    """The input of layer ``layer``'s experts (= its router input) for ``ids`` [B, T]:
    full blocks below, then the attention half and ``post_attention_layernorm`` -> [B, T, H]."""
    h = L.run_embed(model, ids)
    pos = L.positions(model, h)
    h = L.run_blocks(model, h, 0, layer, pos)
    blk = L.base(model).layers[layer]
    attn, _ = blk.self_attn(hidden_states=blk.input_layernorm(h), position_embeddings=pos.position_embeddings,
                            attention_mask=pos.masks[L._layer_type(model, layer, pos)],
                            position_ids=pos.position_ids)
    return blk.post_attention_layernorm(h + attn)


def attention_inputs(model, layer, ids=None, embeds=None):
    """Layer ``layer``'s input-norm hidden state (what PrivateLoRA's A multiplies) for
    ``ids`` or uploaded ``embeds``, with an unadapted stack (M = 0) -> [B, T, H]."""
    h = L.run_embed(model, ids) if embeds is None else embeds
    h = L.run_blocks(model, h, 0, layer)
    return L.base(model).layers[layer].input_layernorm(h)


def aux_rows(view, seq_len, records=400):
    """Public auxiliary text (:meth:`AdversaryView.aux_text`) tokenized and packed into
    rows of ``seq_len`` -> int64 [rows, seq_len]."""
    texts = view.aux_text(records)
    ids = encode_records(view.tokenizer(), [{"text": t} for t in texts])
    return pack(ids, seq_len)


def batched(fn, ids, batch=64):
    """``fn`` over ``ids`` [N, T] in chunks of ``batch`` rows, concatenated, no grad."""
    with torch.no_grad():
        return torch.cat([fn(ids[i:i + batch]) for i in range(0, len(ids), batch)])


def nearest(states, table, metric="cosine", chunk=4096):
    """Index of the nearest row of ``table`` [V, H] for each row of ``states`` [N, H] and
    its score (cosine similarity, or minus the L2 distance) -> (long [N], float [N])."""
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric: expected 'cosine' or 'l2' (got {metric!r})")
    table = table.double()
    tn = F.normalize(table, dim=-1)
    idx, score = [], []
    for part in states.double().split(chunk):
        if metric == "cosine":
            s = F.normalize(part, dim=-1) @ tn.T
        else:
            s = -torch.cdist(part, table)
        best = s.max(-1)
        idx.append(best.indices)
        score.append(best.values)
    if not idx:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.double)
    return torch.cat(idx), torch.cat(score)


def candidate_ids(view, vocab_size):
    """Token ids a private row can hold: the vocabulary less the reserved tokens
    (``<pad>``, ``<unk>``, ...) that packed records never contain; ``<eos>`` ends every
    record and stays.  Without the tokenizer in the threat model: every id."""
    if "tokenizer" not in view.knowledge:
        return torch.arange(vocab_size)
    vocab = view.tokenizer().get_vocab(with_added_tokens=True)
    reserved = {i for t, i in vocab.items() if t.startswith("<") and t.endswith(">") and i != EOS_ID}
    return torch.tensor([i for i in range(vocab_size) if i not in reserved])


MOE_NOTE = ("PC-MoE expert messages carry no token positions (meta: layer, experts, counts, "
            "origin, host): one guess per received row, placed by the owner's truth for scoring")


def moe_reconstruction(cap, predicted, **meta):
    """A routed :class:`Reconstruction` of the origin's batch from one PC-MoE expert
    message: ``predicted`` holds one token id per received row, in message order (the
    scorer places them by position and also scores their set)."""
    from .base import Reconstruction
    rows = [int(t) for t in predicted]
    return Reconstruction(cap.protocol, cap.party, cap.step, rows, kind="routed", meta={
        "layer": cap.meta.get("layer"), "host": cap.meta.get("host"), "experts": cap.meta.get("experts"),
        "counts": cap.meta.get("counts"), "seq": cap.seq, "rows": rows, "note": MOE_NOTE, **meta})


def sequence_reconstructions(cap, ids, **meta):
    """One row-aligned sequence :class:`Reconstruction` per row of ``ids`` [B, T]."""
    from .base import Reconstruction
    return [Reconstruction(cap.protocol, cap.party, cap.step, row, row=b,
                           meta={"layer": cap.meta.get("layer"), "seq": cap.seq, **meta})
            for b, row in enumerate(ids.tolist())]
