"""Analytic training-memory projection for real model shapes: PC-MoE party vs centralized.

``project(model, parties, batch, seq_len, dtype)`` takes a model instantiated on the
meta device (:func:`parties.shapes.meta_model`), counts its parameters -- backbone vs
experts, from the tensors themselves -- and returns the peak training memory of one
site holding the whole model (``centralized``) and of the PC-MoE party that hosts the
most experts (round-robin: ``ceil(E / n)`` per layer), split into parameters,
gradients, optimizer state and activations.

Assumptions (also in the result's ``assumptions``):

* Parameters and gradients in ``dtype``; AdamW keeps two moments per trainable
  parameter in ``optimizer_dtype`` (default: ``dtype``, as ``torch.optim.AdamW`` does;
  pass ``float32`` for mixed-precision moments).  No fp32 master copy, no ZeRO, no
  activation recomputation.
* Activations are what an eager implementation saves for backward, per token:
  attention ``5H + 2KV`` (RMSNorm input, q/k/v input, rotated q, k, v, SDPA output,
  o_proj input), MoE block ``2H + 2E`` (norm input, router input, router logits and
  probabilities), each of the top-k (token, expert) pairs ``2H + 4I`` (gathered input,
  gate_up output, activation, product, expert output), a shared expert ``H + 4I_s``,
  a dense MLP ``2H + 4I``; final norm and LM head ``2H``, logits ``V`` (plus a float32
  copy for the loss when ``dtype`` is 16-bit).
* PC-MoE: routing is uniform in expectation, so a fraction ``f = hosted / E`` of each
  token's top-k pairs runs locally; for the others the owner keeps only the returned
  output (``H`` per pair).  A host serving another party's batch of the same size
  keeps ``H + 4I`` per pair for its fraction.  A party's peak uses the larger of the
  two (they never overlap in time: one party trains per global step).
* A dense model (LLaMA) has no experts to shard: a party holds the whole model.
"""
import math
from dataclasses import asdict, dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Breakdown:
    params: float = 0
    grads: float = 0
    optimizer: float = 0
    activations: float = 0

    @property
    def total(self):
        return self.params + self.grads + self.optimizer + self.activations

    def as_dict(self):
        return {**asdict(self), "total": self.total}


@dataclass
class ModelStats:
    """What the projection needs to know about an architecture."""

    total_params: int
    expert_params: int               # all routed experts, all layers
    layers: int
    hidden: int
    kv_dim: int
    vocab: int
    num_experts: int = 0             # routed experts per MoE layer (0: dense)
    top_k: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0     # Qwen-MoE's always-on shared expert
    dense_intermediate: int = 0      # a dense MLP (LLaMA)
    moe_layers: int = 0

    @property
    def backbone_params(self):
        return self.total_params - self.expert_params


def model_stats(model):
    """Count parameters (backbone vs routed experts) and read the shapes activations need."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    st = ModelStats(total_params=sum(p.numel() for p in model.parameters()), expert_params=0,
                    layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                    kv_dim=cfg.num_key_value_heads * head_dim, vocab=cfg.vocab_size)
    for layer in model.model.layers:
        mlp = layer.mlp
        experts = getattr(mlp, "experts", None)
        if experts is not None and hasattr(experts, "gate_up_proj"):
            st.moe_layers += 1
            st.expert_params += sum(p.numel() for p in experts.parameters())
            st.num_experts = experts.gate_up_proj.shape[0]
            st.expert_intermediate = experts.gate_up_proj.shape[1] // 2
            st.top_k = cfg.num_experts_per_tok
            shared = getattr(mlp, "shared_expert", None)
            if shared is not None:
                st.shared_intermediate = shared.gate_proj.out_features
        elif hasattr(mlp, "gate_proj"):
            st.dense_intermediate = mlp.gate_proj.out_features
    return st


def assumption_lines():
    """The assumptions of this module's docstring, one string per bullet (the CLI prints them)."""
    text = __doc__.split("Assumptions (also in the result's ``assumptions``):")[1]
    bullets = [" ".join(b.split()) for b in text.split("\n* ") if b.strip()]
    return [b.removeprefix("* ").replace("``", "") for b in bullets]


def hosted_max(num_experts, parties):
    """Experts per layer on the busiest party under round-robin assignment."""
    return math.ceil(num_experts / parties) if num_experts else 0


def activations_per_token(st, b, local_fraction=1.0, host_only=False):
    """Bytes saved for backward per token of the batch (see module docstring).

    ``local_fraction``: share of each token's expert pairs computed where the batch is;
    ``host_only``: only the hosted experts' share of another party's batch."""
    H, I = st.hidden, st.expert_intermediate
    per_pair_local, per_pair_remote = 2 * H + 4 * I, H
    if host_only:
        return st.moe_layers * st.top_k * local_fraction * (H + 4 * I) * b
    attn = 5 * H + 2 * st.kv_dim
    moe = 2 * H * b + 2 * st.num_experts * 4 + st.top_k * b * (
        local_fraction * per_pair_local + (1 - local_fraction) * per_pair_remote)
    if st.shared_intermediate:
        moe += (H + 4 * st.shared_intermediate) * b
    dense = (2 * H + 4 * st.dense_intermediate) * b
    per_layer = attn * b + (moe if st.num_experts else dense)
    final = 2 * H * b + st.vocab * b + (st.vocab * 4 if b != 4 else 0)
    return st.layers * per_layer + final


def project(model, parties, batch, seq_len, dtype="bfloat16", optimizer_dtype=None):
    """Centralized vs per-party training memory; returns a JSON-able dict."""
    if parties < 1:
        raise ValueError(f"parties: must be >= 1 (got {parties})")
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be >= 1 (got {batch}, {seq_len})")
    for name, d in (("dtype", dtype), ("optimizer_dtype", optimizer_dtype or dtype)):
        if d not in DTYPE_BYTES:
            raise ValueError(f"{name}: unknown dtype {d!r}; valid: {', '.join(DTYPE_BYTES)}")
    b, ob = DTYPE_BYTES[dtype], DTYPE_BYTES[optimizer_dtype or dtype]
    st = model_stats(model)
    tokens = batch * seq_len

    def state(n_params, acts):
        return Breakdown(n_params * b, n_params * b, 2 * n_params * ob, acts)

    central = state(st.total_params, tokens * activations_per_token(st, b))
    if st.num_experts:
        hosted = hosted_max(st.num_experts, parties)
        per_expert = st.expert_params / (st.num_experts * st.moe_layers)
        party_params = st.backbone_params + hosted * per_expert * st.moe_layers
        f = hosted / st.num_experts
        acts = tokens * max(activations_per_token(st, b, local_fraction=f),
                            activations_per_token(st, b, local_fraction=f, host_only=True))
        party = state(party_params, acts)
    else:
        hosted, party = 0, state(st.total_params, central.activations)
    return {
        "params": {"total": st.total_params, "experts": st.expert_params,
                   "backbone": st.backbone_params,
                   "expert_share": st.expert_params / st.total_params,
                   "party": party.params / b},
        "shape": asdict(st), "parties": parties, "hosted_experts_per_layer": hosted,
        "batch": batch, "seq_len": seq_len, "dtype": dtype, "optimizer_dtype": optimizer_dtype or dtype,
        "centralized": central.as_dict(), "party": party.as_dict(),
        "reduction": 1 - party.total / central.total,
        "assumptions": __doc__.split("Assumptions (also in the result's ``assumptions``):")[1].strip(),
        "assumption_lines": assumption_lines(),
    }
