"""PrivateLoRA's model pieces: the cloud's decoder stack with adapted q/k/v, the device's ends.

Paper: Wang et al., "PrivateLoRA For Efficient Privacy Preserving LLM", arXiv 2311.14030.
The update of each of q, k, v in every layer is ``ΔW = A·M·B``; in the row-vector
convention of ``nn.Linear`` inputs, ``delta(x) = ((x A) M) B`` with

* ``A``: d × r_c2d, frozen, random (from a seeded ``torch.Generator``),
* ``M``: r_c2d × r_d2c, trainable, zero-initialised, held by the device only,
* ``B``: r_d2c × d_out, frozen, random.

In PrivateLoRA mode (``lowrank``) A and B sit on the cloud, wrapped around the HF
``LlamaAttention.q_proj/k_proj/v_proj``; in the full-hidden baseline (``full``) the
device holds A, M and B and the cloud only adds the delta it receives.  Both modes draw
A and B from the same generator, so they compute the same function.

:class:`CloudStack` runs one decoder layer in two halves so that a role generator can
yield between them: :meth:`CloudStack.down` (normed input -> what goes to the device)
and :meth:`CloudStack.attend` (the device's reply -> the layer's output).
"""
import math

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from parties.layers import CACHE_KW

PROJECTIONS = ("q", "k", "v")


def projection_dims(config):
    """Output width of the q, k and v projections of a LLaMA config."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"q": config.num_attention_heads * hd, "k": config.num_key_value_heads * hd,
            "v": config.num_key_value_heads * hd}


def frozen_factors(config, r_c2d, r_d2c, gen, dtype):
    """The frozen random A (d×r_c2d) and B (r_d2c×d_out) for every layer and projection.

    Returns ``[{p: (A, B)} for each layer]``.  ``A ~ N(0, 1/d)`` keeps ``x A`` at the
    scale of the normed input; ``B ~ N(0, 1/r_d2c)`` keeps ``(·) B`` scale-preserving, so
    the learning rate of M means the same at every width.
    """
    d, dims = config.hidden_size, projection_dims(config)
    out = []
    for _ in range(config.num_hidden_layers):
        layer = {}
        for p in PROJECTIONS:
            a = torch.randn(d, r_c2d, generator=gen) / math.sqrt(d)
            b = torch.randn(r_d2c, dims[p], generator=gen) / math.sqrt(r_d2c)
            layer[p] = (a.to(dtype), b.to(dtype))
        out.append(layer)
    return out


class AdaptedProjection(nn.Module):
    """A frozen projection plus a delta that arrives from the device.

    ``forward(x) = base(x) + incoming @ B`` (or ``+ incoming`` without B, the full-hidden
    split).  The caller sets :attr:`incoming` for exactly one call.
    """

    def __init__(self, base, a=None, b=None):
        super().__init__()
        self.base = base
        self.A = None if a is None else nn.Parameter(a, requires_grad=False)
        self.B = None if b is None else nn.Parameter(b, requires_grad=False)
        self.incoming = None

    def down(self, x):
        return x @ self.A

    def forward(self, x):
        assert self.incoming is not None, "AdaptedProjection called without the device's delta"
        delta, self.incoming = self.incoming, None
        if self.B is not None:
            delta = delta @ self.B
        return self.base(x) + delta.to(x.dtype)


class CloudStack(nn.Module):
    """The cloud's share of a LLaMA model: decoder layers (q/k/v wrapped), final norm, RoPE.

    ``model`` is the cloud's copy of the shared checkpoint; its embeddings and LM head are
    deleted here.  ``factors`` is :func:`frozen_factors` output (PrivateLoRA) or ``None``
    (full-hidden split: the cloud holds no adapter weights).
    """

    def __init__(self, model, factors=None):
        super().__init__()
        inner = model.model
        self.config = model.config
        model.lm_head = None          # the cloud never holds the device's ends
        inner.embed_tokens = None
        self.layers, self.norm, self.rotary = inner.layers, inner.norm, inner.rotary_emb
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            for p in PROJECTIONS:
                ab = factors[i][p] if factors is not None else (None, None)
                setattr(attn, f"{p}_proj", AdaptedProjection(getattr(attn, f"{p}_proj"), *ab))
        self.lowrank = factors is not None
        self.requires_grad_(False)

    def proj(self, layer, p):
        return getattr(self.layers[layer].self_attn, f"{p}_proj")

    def context(self, h0, cache=None, start=0):
        """Rotary embeddings and causal mask for a pass of ``h0`` starting at ``start``."""
        pos = torch.arange(start, start + h0.shape[1], device=h0.device).unsqueeze(0)
        pe = self.rotary(h0, pos)
        mask = create_causal_mask(config=self.config, inputs_embeds=h0, attention_mask=None,
                                  position_ids=pos, **{CACHE_KW: cache})
        return pe, mask

    def down(self, layer, h_in):
        """-> (normed input x, tensors for the device: {q,k,v: x A} or {x: x})."""
        x = self.layers[layer].input_layernorm(h_in)
        if self.lowrank:
            return x, {p: self.proj(layer, p).down(x) for p in PROJECTIONS}
        return x, {"x": x}

    def attend(self, layer, h_in, x, incoming, ctx, cache=None):
        """The rest of decoder layer ``layer`` given the device's ``incoming`` deltas."""
        blk = self.layers[layer]
        for p in PROJECTIONS:
            self.proj(layer, p).incoming = incoming[p]
        pe, mask = ctx
        attn, _ = blk.self_attn(hidden_states=x, position_embeddings=pe, attention_mask=mask,
                                **{CACHE_KW: cache})
        h = h_in + attn
        return h + blk.mlp(blk.post_attention_layernorm(h))

    def layer_bytes(self, layer):
        """Bytes of every weight layer ``layer`` reads in one pass (adapters included)."""
        return sum(p.numel() * p.element_size() for p in self.layers[layer].parameters())

    def norm_bytes(self):
        return sum(p.numel() * p.element_size() for p in self.norm.parameters())


class DeviceEnds(nn.Module):
    """The device's share: embeddings, LM head (both frozen) and the trainable M per layer.

    ``model`` is the device's copy of the shared checkpoint; its decoder layers and final
    norm are deleted here.  With ``factors`` (full-hidden split) the device also holds
    the frozen A and B and applies the whole ``((x A) M) B``.
    """

    def __init__(self, model, r_c2d, r_d2c, factors=None):
        super().__init__()
        inner = model.model
        inner.layers = nn.ModuleList()   # the device never holds the decoder stack
        inner.norm = None
        self.embed, self.head = inner.embed_tokens, model.lm_head
        self.embed.requires_grad_(False)
        self.head.requires_grad_(False)
        dtype = self.embed.weight.dtype
        n = model.config.num_hidden_layers
        self.M = nn.ModuleList(nn.ParameterDict({p: nn.Parameter(torch.zeros(r_c2d, r_d2c, dtype=dtype))
                                                 for p in PROJECTIONS}) for _ in range(n))
        self.full = factors is not None
        if self.full:
            self.AB = nn.ModuleList(nn.ParameterDict({
                f"{p}_{w}": nn.Parameter(t, requires_grad=False)
                for p in PROJECTIONS for w, t in zip("AB", factors[i][p])}) for i in range(n))

    def adapt(self, layer, received):
        """The device's reply for one layer: ``{p: (x A) M}`` or ``{p: ((x A) M) B}``."""
        m = self.M[layer]
        if not self.full:
            return {p: received[p] @ m[p] for p in PROJECTIONS}
        ab, x = self.AB[layer], received["x"]
        return {p: ((x @ ab[f"{p}_A"]) @ m[p]) @ ab[f"{p}_B"] for p in PROJECTIONS}

    def pass_bytes(self, tokens):
        """Weight bytes one pass reads: ``tokens`` embedding rows, the head, every adapter."""
        emb = tokens * self.embed.weight.shape[1] * self.embed.weight.element_size()
        rest = [self.head.weight] + list(self.M.parameters())
        if self.full:
            rest += list(self.AB.parameters())
        return emb + sum(p.numel() * p.element_size() for p in rest)


class SavedTensors:
    """Bytes autograd saves for backward, summed over several segments of one pass.

    ``MemoryTracker.activations_scope`` measures one uninterrupted block; a role that
    yields between layers keeps every layer's graph alive at once, so it collects each
    segment here and reports the sum with ``tracker.add_activations``.
    """

    def __init__(self, modules):
        self.exclude = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
        self.saved = {}

    def segment(self):
        def pack(t):
            try:
                s = t.untyped_storage()
                if s.data_ptr() not in self.exclude:
                    self.saved[s.data_ptr()] = s.nbytes()
            except (RuntimeError, NotImplementedError):
                pass
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def add(self, *tensors):
        """Count tensors held outside autograd (buffered for a later backward)."""
        for t in tensors:
            s = t.untyped_storage()
            self.saved[s.data_ptr()] = s.nbytes()

    def total(self):
        return sum(self.saved.values())
