"""PrivateLoRA's wire format and options: message kinds, metadata, the message plan.

Every message the protocol sends is built from the helpers here, and the same helpers
enumerate the messages of a pass for the analytic throughput model
(:mod:`testbed.costs.throughput`), so model and engine count the same bytes, framing included.

Message kinds (``direction`` c2d = cloud -> device, d2c = device -> cloud):

==============  =====  ==========================================================
kind            dir    tensors (B = batch, T = tokens in the pass)
==============  =====  ==========================================================
``embed``       d2c    ``embeddings`` [B,T,d] -- once per pass
``act_down``    c2d    per layer: ``q,k,v`` = A·x [B,T,r_c2d]  (full: ``x`` [B,T,d])
``act_up``      d2c    per layer: ``q,k,v`` = M·A·x [B,T,r_d2c] (full: ΔW·x [B,T,d_out])
``hidden``      c2d    ``hidden`` = final normed hidden state (generation: last position)
``grad_hidden`` d2c    ``grad`` = dL/d(hidden)
``grad_down``   c2d    per layer, last to first: ``q,k,v`` = dL/d(M·A·x)  (full: dL/d(ΔW·x))
``grad_up``     d2c    per layer except layer 0: ``q,k,v`` = dL/d(A·x)  (full: ``x`` = dL/dx)
==============  =====  ==========================================================

Layer 0's ``grad_up`` and dL/d(embeddings) are not sent: embeddings are frozen in
PrivateLoRA, so nothing upstream of layer 0's adapter input needs a gradient.
"""
from dataclasses import dataclass

from testbed.errors import ConfigError

from .lowrank import PROJECTIONS, projection_dims

EMBED, ACT_DOWN, ACT_UP, HIDDEN = "embed", "act_down", "act_up", "hidden"
GRAD_HIDDEN, GRAD_DOWN, GRAD_UP = "grad_hidden", "grad_down", "grad_up"
CLOUD = "cloud"
# What each tensor is, for analysts and attacks (meta "quantity").
QUANTITY = {
    ("lowrank", ACT_DOWN): "A_x", ("lowrank", ACT_UP): "M_A_x",
    ("lowrank", GRAD_DOWN): "grad_M_A_x", ("lowrank", GRAD_UP): "grad_A_x",
    ("full", ACT_DOWN): "x", ("full", ACT_UP): "delta_W_x",
    ("full", GRAD_DOWN): "grad_delta_W_x", ("full", GRAD_UP): "grad_x",
}
DIRECTION = {EMBED: "d2c", ACT_DOWN: "c2d", ACT_UP: "d2c", HIDDEN: "c2d", GRAD_HIDDEN: "d2c",
             GRAD_DOWN: "c2d", GRAD_UP: "d2c"}
WIRE_DTYPES = ("float32", "bfloat16", "float16")
# Protocols that read PrivateLoRA's options; as baselines they inherit the main protocol's.
FAMILY = ("privatelora", "privatelora_full", "lora", "device_only", "cloud_only")


@dataclass(frozen=True)
class Options:
    r_c2d: int = 16
    r_d2c: int = 16
    wire_dtype: str | None = None   # None: the model's dtype
    generate_tokens: int = 8
    prompt_len: int = 8
    eval_base: bool = True
    weight_traffic: bool = False    # yield Compute(bytes=weights read) in generation
    lora_alpha: float | None = None  # LoRA baselines; None: 2 x rank


def family_options(ctx):
    """The options a protocol of the PrivateLoRA family runs with.

    The main protocol reads ``protocol.options``; a baseline of a PrivateLoRA-family
    scenario inherits them (same ranks, same generation sample), so comparisons are fair.
    """
    if ctx.options:
        return ctx.options
    if ctx.scenario.protocol.name in FAMILY:
        return ctx.scenario.protocol.options
    return {}


def parse_options(raw, scenario):
    """Validate ``protocol.options``; raise ConfigError listing every problem."""
    known = {"rank", "r_c2d", "r_d2c", "wire_dtype", "generate_tokens", "prompt_len",
             "eval_base", "weight_traffic", "lora_alpha"}
    problems = [f"{k}: unknown option; valid: {', '.join(sorted(known))}" for k in raw if k not in known]

    def pos_int(key, default, minimum=1):
        v = raw.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            problems.append(f"{key}: must be an integer >= {minimum} (got {v!r})")
            return default
        return v

    rank = pos_int("rank", 16)
    r_c2d, r_d2c = pos_int("r_c2d", rank), pos_int("r_d2c", rank)
    gen_tokens = pos_int("generate_tokens", 8, minimum=0)
    prompt_len = pos_int("prompt_len", 8)
    if prompt_len >= scenario.training.seq_len:
        problems.append(f"prompt_len: must be < training.seq_len {scenario.training.seq_len} "
                        f"(got {prompt_len})")
    wire = raw.get("wire_dtype")
    if wire is not None and wire not in WIRE_DTYPES:
        problems.append(f"wire_dtype: must be one of {', '.join(WIRE_DTYPES)} (got {wire!r})")
    flags = {}
    for key, default in (("eval_base", True), ("weight_traffic", scenario.compute.mode == "flops")):
        v = raw.get(key, default)
        if not isinstance(v, bool):
            problems.append(f"{key}: must be true or false (got {v!r})")
        flags[key] = bool(v)
    alpha = raw.get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        problems.append(f"lora_alpha: must be a number > 0 (got {alpha!r})")
    if problems:
        raise ConfigError("protocol.options", problems)
    return Options(r_c2d=r_c2d, r_d2c=r_d2c, wire_dtype=wire, generate_tokens=gen_tokens,
                   prompt_len=prompt_len, lora_alpha=alpha, **flags)


def layer_meta(kind, lowrank, mode, layer, party, r_c2d, r_d2c, phase):
    """Metadata of a per-layer message: enough to solve for M from the capture.

    ``rank`` is the adapter rank on this side of M (r_c2d for A·x and its gradient,
    r_d2c for M·A·x and its gradient); ``split`` says whether the tensors are the
    low-rank ones (PrivateLoRA) or full-width (the full-hidden split).
    """
    return {"layer": layer, "projections": list(PROJECTIONS),
            "rank": r_c2d if kind in (ACT_DOWN, GRAD_UP) else r_d2c,
            "direction": DIRECTION[kind], "phase": phase, "mode": mode, "party": party,
            "split": "lowrank" if lowrank else "full",
            "quantity": QUANTITY[("lowrank" if lowrank else "full", kind)]}


def pass_meta(kind, mode, party, start, phase):
    """Metadata of a once-per-pass message (embeddings, final hidden state, its gradient)."""
    q = {EMBED: "embeddings", HIDDEN: "final_hidden", GRAD_HIDDEN: "grad_final_hidden"}[kind]
    return {"direction": DIRECTION[kind], "phase": phase, "mode": mode, "party": party,
            "position": start, "quantity": q}


def layer_tensors(kind, lowrank, r_c2d, r_d2c, dims, d):
    """Tensor name -> last dimension of a per-layer message."""
    if lowrank:
        width = r_c2d if kind in (ACT_DOWN, GRAD_UP) else r_d2c
        return {p: width for p in PROJECTIONS}
    if kind in (ACT_DOWN, GRAD_UP):
        return {"x": d}
    return dict(dims)


def pass_plan(config, lowrank, r_c2d, r_d2c, wire_dtype, party, step, tokens, start):
    """The messages of one generation pass of ``tokens`` new tokens from position ``start``
    (batch 1), in order: ``[{src, dst, kind, step, meta, tensors: {name: (dtype, shape)}}]``."""
    d, dims = config.hidden_size, projection_dims(config)
    msgs = [_spec(party, CLOUD, EMBED, step, pass_meta(EMBED, "generate", party, start, "fwd"),
                  {"embeddings": (wire_dtype, [1, tokens, d])})]
    for layer in range(config.num_hidden_layers):
        for kind, src, dst in ((ACT_DOWN, CLOUD, party), (ACT_UP, party, CLOUD)):
            meta = layer_meta(kind, lowrank, "generate", layer, party, r_c2d, r_d2c, "fwd")
            widths = layer_tensors(kind, lowrank, r_c2d, r_d2c, dims, d)
            msgs.append(_spec(src, dst, kind, step, meta,
                              {n: (wire_dtype, [1, tokens, w]) for n, w in widths.items()}))
    msgs.append(_spec(CLOUD, party, HIDDEN, step, pass_meta(HIDDEN, "generate", party, start, "fwd"),
                      {"hidden": (wire_dtype, [1, 1, d])}))
    return msgs


def generation_plan(config, lowrank, r_c2d, r_d2c, wire_dtype, party, step, prompt_len, tokens):
    """Every message of generating ``tokens`` tokens from a ``prompt_len`` prompt (batch 1).

    One prefill pass, then ``tokens - 1`` decode passes (the last token is not fed back).
    Returns a list of passes ``{"tokens": T, "start": position, "messages": pass_plan(...)}``.
    """
    passes, start, q = [], 0, prompt_len
    for _ in range(tokens):
        passes.append({"tokens": q, "start": start, "messages": pass_plan(
            config, lowrank, r_c2d, r_d2c, wire_dtype, party, step, q, start)})
        start, q = start + q, 1
    return passes


def _spec(src, dst, kind, step, meta, tensors):
    return {"src": src, "dst": dst, "kind": kind, "step": step, "meta": meta, "tensors": tensors}
