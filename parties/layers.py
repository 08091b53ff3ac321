"""Run a Hugging Face decoder LM piece by piece: embeddings, a range of blocks, the head.

Protocols that cut a model between roles (split learning, PC-MoE, PrivateLoRA) need the
pieces of ``model(input_ids)`` separately.  This module reproduces what transformers 5.x
``LlamaModel`` / ``MixtralModel`` / ``OlmoeModel`` / ``Qwen2MoeModel`` ``forward`` does:

1. ``h = model.model.embed_tokens(ids)``;
2. ``position_ids = arange(T)[None]``, ``position_embeddings = model.model.rotary_emb(h,
   position_ids)`` (the (cos, sin) pair every attention layer takes), and the causal mask
   from ``transformers.masking_utils.create_causal_mask`` (or the sliding-window variant for
   layers whose ``config.layer_types`` say so, or all layers when ``config.sliding_window``
   is set, as Mixtral does);
3. ``h = layer(h, attention_mask=mask, position_embeddings=..., position_ids=...)`` per
   decoder layer;
4. ``logits = model.lm_head(model.model.norm(h))``.

Run end to end it gives the full model's logits bit for bit (tests/test_layers.py).
MoE routers' logits can be collected per block (for the load-balancing auxiliary loss,
:func:`aux_loss`).  :func:`keep_only` replaces the parts a role does not hold with
``nn.Identity`` so the role's copy neither stores nor trains them, while block indices
stay global.
"""
import contextlib
import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

# The keyword for the KV cache in the mask builders and attention layers: ``cache`` since
# transformers 5.x deprecated ``past_key_values`` (removal announced for 5.40); older releases
# only know ``past_key_values``.
CACHE_KW = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


@dataclass
class Positions:
    """What every decoder layer needs besides the hidden states (same for any cut)."""

    position_ids: torch.Tensor          # [1, T]
    position_embeddings: tuple          # (cos, sin), each [1, T, head_dim]
    masks: dict                         # layer type -> mask (None: SDPA's is_causal path)


def base(model):
    """The decoder stack (``model.model`` of a ``*ForCausalLM``)."""
    return model.model


def num_layers(model):
    return model.config.num_hidden_layers


def positions(model, h):
    """Position ids, rotary (cos, sin) and causal masks for hidden states ``h`` [B, T, H]."""
    cfg, dec = model.config, base(model)
    pos_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
    kw = dict(config=cfg, inputs_embeds=h, attention_mask=None, position_ids=pos_ids, **{CACHE_KW: None})
    masks = {"full_attention": create_causal_mask(**kw)}
    types = set(getattr(cfg, "layer_types", None) or [])
    if "sliding_attention" in types or getattr(cfg, "sliding_window", None) and not types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
    return Positions(pos_ids, dec.rotary_emb(h, position_ids=pos_ids), masks)


def _layer_type(model, i, pos):
    types = getattr(model.config, "layer_types", None)
    if types:
        return types[i]
    return "sliding_attention" if "sliding_attention" in pos.masks else "full_attention"


def run_embed(model, ids):
    """Token ids [B, T] -> input embeddings [B, T, H]."""
    return base(model).embed_tokens(ids)


@contextlib.contextmanager
def collect_router_logits(modules, out):
    """Append every MoE router's logits [tokens, E] computed inside the block to ``out``."""
    hooks = [m.register_forward_hook(lambda _m, _i, o: out.append(o[0] if isinstance(o, tuple) else o))
             for m in routers(modules)]
    try:
        yield out
    finally:
        for hk in hooks:
            hk.remove()


def routers(modules):
    """The MoE router modules (``mlp.gate`` whose forward returns the router logits)."""
    found = []
    for mod in modules:
        for m in mod.modules():
            if type(m).__name__.endswith("TopKRouter"):
                found.append(m)
    return found


def run_blocks(model, h, start, end, pos=None, router_logits=None):
    """Decoder layers ``start`` .. ``end - 1`` (global indices) on ``h`` [B, T, H].

    ``pos``: a :class:`Positions` (computed from ``h`` when omitted; every role can compute
    it from the sequence length alone, so it never needs to cross a wire).
    ``router_logits``: a list to which each MoE block appends its router logits.
    """
    if not 0 <= start <= end <= num_layers(model):
        raise ValueError(f"run_blocks: need 0 <= start <= end <= {num_layers(model)} "
                         f"(got start={start}, end={end})")
    if start == end:
        return h
    pos = pos if pos is not None else positions(model, h)
    layers = [base(model).layers[i] for i in range(start, end)]
    ctx = collect_router_logits(layers, router_logits) if router_logits is not None \
        else contextlib.nullcontext()
    with ctx:
        for i, layer in zip(range(start, end), layers):
            h = layer(h, attention_mask=pos.masks[_layer_type(model, i, pos)],
                      position_embeddings=pos.position_embeddings, position_ids=pos.position_ids)
    return h


def run_norm(model, h):
    """The final norm: last decoder hidden state -> ``last_hidden_state``."""
    return base(model).norm(h)


def run_head(model, h):
    """Final norm + LM head: last decoder hidden state [B, T, H] -> logits [B, T, V]."""
    return model.lm_head(run_norm(model, h))


def run_all(model, ids, router_logits=None):
    """The whole model through the pieces (equals ``model(input_ids=ids).logits``)."""
    h = run_embed(model, ids)
    return run_head(model, run_blocks(model, h, 0, num_layers(model), router_logits=router_logits))


def causal_lm_loss(logits, ids):
    """Mean next-token cross-entropy, as transformers' ``ForCausalLMLoss`` with labels=ids."""
    logits = logits[:, :-1].float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def aux_loss(model, router_logits):
    """``router_aux_loss_coef`` x the family's load-balancing loss over ``router_logits``.

    Zero for dense models or when no router ran.  Note the loss is not additive over
    layers (it multiplies means over all layers' tokens), so a model cut in two and
    computing it per side differs slightly from the full model's value.
    """
    coef = getattr(model.config, "router_aux_loss_coef", 0.0)
    if not router_logits or not coef:
        return torch.zeros(())
    fn = sys.modules[type(model).__module__].load_balancing_loss_func
    return coef * fn(tuple(router_logits), model.num_experts, model.num_experts_per_tok, None)


def keep_only(model, embed=False, blocks=range(0), head=False):
    """Drop (replace by ``nn.Identity``) every part of ``model`` a role does not hold.

    ``embed``: keep the token embeddings; ``blocks``: global indices of the decoder layers
    to keep; ``head``: keep the final norm and LM head.  The rotary embedding (buffers only)
    is always kept.  Returns ``model`` (modified in place).
    """
    dec = base(model)
    keep = set(blocks)
    if not embed:
        dec.embed_tokens = nn.Identity()
    for i in range(len(dec.layers)):
        if i not in keep:
            dec.layers[i] = nn.Identity()
    if not head:
        dec.norm = nn.Identity()
        model.lm_head = nn.Identity()
    return model
