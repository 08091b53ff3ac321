"""Analytic serving-throughput model: PrivateLoRA vs device-only, cloud-only and the full-hidden split.

For a LLaMA shape (built on the meta device, so nothing is allocated or downloaded),
a device profile and a cloud profile (:mod:`testbed.engine.devices`) and the device's and the
cloud's links (:mod:`testbed.engine.links`), it predicts prefill and decode tokens/s of

* ``device_only``  -- the whole model on the device, no network;
* ``cloud_only``   -- the whole model in the cloud; the prompt's token ids go up, each
  generated token id comes down (streamed: the link is off the decode critical path);
* ``privatelora``  -- PrivateLoRA (arXiv 2311.14030): per token one embedding up, per
  layer A·x down and M·A·x up, one final hidden state down;
* ``full_hidden``  -- the same split without the low-rank compression: x down, ΔW·x up.

The assumptions are the embedded engine's, so the engine running the same protocol on
the same profiles agrees with this model (``tests/test_throughput.py``):

* ``batch`` sequences decoded in lockstep (default 1): FLOPs, KV cache, embedding rows and
  wire tensors scale with it, every weight is read once per pass; compute on one side at a
  time (the protocol is sequential);
* side time = FLOPs / peak FLOP/s + bytes / memory bandwidth (no compute/memory overlap,
  as the engine adds its FLOP-counted compute and the roles' ``Compute(bytes=...)``;
  ``overlap=True`` takes the roofline max instead).  Decode is then memory-bound (every
  weight read once per token), prefill compute-bound (FLOPs grow with the prompt);
* FLOPs: 2·in·out per token per linear layer (adapters included) and 4·q·kv·d_q for
  attention scores and values (``count_attention``; the engine's ``FlopCounterMode`` does
  not see PyTorch's CPU SDPA kernel, so it leaves these out); the LM head on one position;
* bytes: every weight of a layer once per pass, its KV cache (2·kv·d_kv), the embedding
  rows of the pass's tokens, the LM head; at ``dtype_bytes`` per element;
* a message of n bytes (framing included, computed exactly like :mod:`testbed.engine.codec`)
  takes n·8 / min(sender up, receiver down) to serialize, then both endpoints' one-way
  latencies, plus the mean of the engine's |N(0, jitter)| (σ·√(2/π)); no loss.

Options that leave the engine's assumptions (the CLI prints which are on):

* ``weight_bits`` (device-only): the device's weights quantized to 4 or 8 bits
  (KV cache, activations and the wire stay at ``dtype_bytes``);
* ``Setup.cloud_tps``: a measured decode tokens/s of the cloud stack (all ``batch``
  sequences together) replaces its roofline: a decode pass takes ``batch / cloud_tps``
  on the cloud, plus PrivateLoRA's A and B from the roofline;
* ``framing=False``: a message costs its tensor payload only; ``ends=False``: no
  embedding upload and no final-hidden download (the PrivateLoRA paper's accounting,
  :mod:`testbed.costs.serving`).
"""
import math
from dataclasses import dataclass, field, replace

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from parties.privatelora.lowrank import projection_dims
from testbed.engine.codec import build_header
from parties.privatelora.wire import CLOUD, pass_plan

# Published shapes (Touvron et al. 2023 for LLaMA-1 30B ("33B") and LLaMA-2; Meta Llama 3; TinyLlama).
MODELS = {
    "llama-2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008, vocab_size=32000),
    "llama-2-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, intermediate_size=13824, vocab_size=32000),
    "llama-30b": dict(hidden_size=6656, num_hidden_layers=60, num_attention_heads=52,
                      num_key_value_heads=52, intermediate_size=17920, vocab_size=32000),
    "llama-2-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=28672, vocab_size=32000),
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256),
    "tinyllama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, intermediate_size=5632, vocab_size=32000),
}
SCHEMES = ("device_only", "cloud_only", "privatelora", "full_hidden")
DTYPE_NAMES = {2: "bfloat16", 4: "float32"}
PARTY = "party-0"


def llama_config(name):
    """LlamaConfig of a named published model; ValueError listing the valid names."""
    try:
        return LlamaConfig(**MODELS[name], tie_word_embeddings=False)
    except KeyError:
        raise ValueError(f"--model: unknown model {name!r}; valid: {', '.join(MODELS)}") from None


@dataclass(frozen=True)
class Shapes:
    """What the model costs per pass, read off a meta-device instance of ``config``."""

    config: object
    dtype_bytes: int
    layer_params: int        # parameters of one decoder layer (norms included)
    layer_linear_macs: int   # multiply-accumulates per token of one layer's linear layers
    norm_params: int         # the final norm
    vocab: int

    @classmethod
    def from_config(cls, config, dtype_bytes=2):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        layer = model.model.layers[0]
        macs = sum(m.in_features * m.out_features for m in layer.modules()
                   if isinstance(m, torch.nn.Linear))
        return cls(config, dtype_bytes, sum(p.numel() for p in layer.parameters()), macs,
                   sum(p.numel() for p in model.model.norm.parameters()), config.vocab_size)

    @property
    def d(self):
        return self.config.hidden_size

    @property
    def layers(self):
        return self.config.num_hidden_layers

    @property
    def dims(self):
        return projection_dims(self.config)

    def kv_bytes(self, kv_len):
        return 2 * kv_len * self.dims["k"] * self.dtype_bytes

    def weight_bytes(self):
        """Every parameter: layers, final norm, embeddings, LM head."""
        return (self.layers * self.layer_params + self.norm_params + 2 * self.vocab * self.d) * self.dtype_bytes


def frame_bytes(spec):
    """Encoded size of a message spec ``{kind, src, dst, step, meta, tensors: {name: (dtype, shape)}}``,
    exactly as :func:`testbed.engine.codec.encode` frames it (length prefix + header + tensors)."""
    tensors = [(name, dtype, list(shape)) for name, (dtype, shape) in spec["tensors"].items()]
    header = build_header(spec["kind"], spec["src"], spec["dst"], spec["step"], spec["meta"], tensors)
    return 4 + len(header) + payload_bytes(spec)


def payload_bytes(spec):
    """Tensor bytes of a message spec, no framing (the paper's accounting)."""
    return sum(math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
               for dtype, shape in spec["tensors"].values())


def batched(spec, batch):
    """A batch-1 message spec with every tensor's leading (batch) dimension set to ``batch``."""
    return {**spec, "tensors": {n: (dt, [batch, *shape[1:]]) for n, (dt, shape) in spec["tensors"].items()}}


@dataclass
class PassCost:
    """FLOPs and memory bytes on each side, and the messages (src, dst, bytes), of one pass.

    ``payload`` holds each message's tensor bytes (``messages`` may include framing);
    ``cloud_adapter_*`` is the part of the cloud's cost that a measured ``cloud_tps``
    does not replace (PrivateLoRA's A and B)."""

    device_flops: float = 0.0
    device_bytes: float = 0.0
    cloud_flops: float = 0.0
    cloud_bytes: float = 0.0
    messages: list = field(default_factory=list)
    payload: list = field(default_factory=list)
    cloud_adapter_flops: float = 0.0
    cloud_adapter_bytes: float = 0.0
    tokens: int = 1              # new tokens in the pass, all sequences together
    decode: bool = False


def _stack_cost(s, q, kv, count_attention, extra_macs=0, extra_params=0, batch=1, wbytes=None):
    """FLOPs and bytes of the decoder stack (+ final norm) for q new tokens at KV length kv,
    for ``batch`` sequences; weights at ``wbytes`` per element (default: the dtype's)."""
    wb = s.dtype_bytes if wbytes is None else wbytes
    att = 4 * q * kv * s.dims["q"] if count_attention else 0
    flops = batch * s.layers * (2 * q * (s.layer_linear_macs + extra_macs) + att)
    nbytes = s.layers * ((s.layer_params + extra_params) * wb + batch * s.kv_bytes(kv)) \
        + s.norm_params * wb
    return flops, nbytes


def pass_cost(s, scheme, q, kv, r_c2d=64, r_d2c=None, count_attention=True, wire_dtype_bytes=None,
              step=0, start=0, batch=1, weight_bits=None, framing=True, ends=True):
    """Cost of one generation pass of ``q`` new tokens at KV length ``kv`` for ``batch`` sequences.

    The LM head runs on the last position only.  ``start`` is the pass's first position
    (it appears in the message headers).  ``weight_bits`` quantizes the device-only
    baseline's weights; ``framing``/``ends`` as in the module docstring.
    """
    r_d2c = r_d2c or r_c2d
    d, dims, b = s.d, s.dims, s.dtype_bytes
    wb = b if weight_bits is None or scheme != "device_only" else weight_bits / 8
    head_flops = batch * 2 * d * s.vocab
    head_bytes = s.vocab * d * wb + batch * q * d * wb       # head + embedding rows
    out = PassCost(tokens=batch * q, decode=q == 1)

    def add(spec):
        spec = batched(spec, batch)
        n = payload_bytes(spec)
        out.payload.append(n)
        out.messages.append((spec["src"], spec["dst"], frame_bytes(spec) if framing else n))

    if scheme in ("device_only", "cloud_only"):
        flops, nbytes = _stack_cost(s, q, kv, count_attention, batch=batch, wbytes=wb)
        flops, nbytes = flops + head_flops, nbytes + head_bytes
        if scheme == "device_only":
            out.device_flops, out.device_bytes = flops, nbytes
        else:
            out.cloud_flops, out.cloud_bytes = flops, nbytes
            # the prompt goes up once (prefill); every pass sends one token id down
            if start == 0:
                add({"kind": "prompt", "src": PARTY, "dst": CLOUD, "step": step, "meta": {"position": start},
                     "tensors": {"input_ids": ("int64", [1, q])}})
            add({"kind": "token", "src": CLOUD, "dst": PARTY, "step": step, "meta": {"position": start + q},
                 "tensors": {"token": ("int64", [1, 1])}})
        return out
    lowrank = scheme == "privatelora"
    adapter_macs = sum(d * r_c2d + r_c2d * r_d2c + r_d2c * dims[p] for p in dims)
    ab_macs = sum(d * r_c2d + r_d2c * dims[p] for p in dims)   # what the cloud runs in PrivateLoRA
    m_params = len(dims) * r_c2d * r_d2c
    flops, nbytes = _stack_cost(s, q, kv, count_attention, ab_macs if lowrank else 0,
                                ab_macs if lowrank else 0, batch=batch)
    out.cloud_flops, out.cloud_bytes = flops, nbytes
    if lowrank:
        out.cloud_adapter_flops = batch * s.layers * 2 * q * ab_macs
        out.cloud_adapter_bytes = s.layers * ab_macs * b
    dev_macs, dev_params = (m_params, m_params) if lowrank else (adapter_macs, adapter_macs)
    out.device_flops = batch * s.layers * 2 * q * dev_macs + head_flops
    out.device_bytes = s.layers * dev_params * b + head_bytes
    wdtype = DTYPE_NAMES[wire_dtype_bytes or b]
    plan = pass_plan(s.config, lowrank, r_c2d, r_d2c, wdtype, PARTY, step, q, start)
    for spec in plan if ends else plan[1:-1]:
        add(spec)
    return out


@dataclass(frozen=True)
class Setup:
    """Profiles of a deployment: device and cloud (DeviceProfile), their links (LinkCfg);
    ``cloud_tps``: measured decode tokens/s of the cloud stack (None: its roofline)."""

    device: object
    cloud: object
    device_link: object
    cloud_link: object
    overlap: bool = False
    cloud_tps: float | None = None

    def link(self, src):
        return self.device_link if src == PARTY else self.cloud_link

    def message_seconds(self, src, dst, nbytes):
        """-> (serialization, latency + mean jitter) seconds of one message."""
        a, b = self.link(src), self.link(dst)
        bw = min(a.up_mbps, b.down_mbps) * 1e6
        jitter = (a.jitter_ms + b.jitter_ms) / 1e3 * math.sqrt(2 / math.pi)
        return nbytes * 8 / bw, (a.latency_ms + b.latency_ms) / 1e3 + jitter

    def rtt_seconds(self):
        """Device <-> cloud round trip: both links' one-way latencies and mean jitter, twice."""
        return 2 * self.message_seconds(PARTY, CLOUD, 0)[1]

    def side_seconds(self, flops, nbytes, prof):
        f, m = flops / prof.flops, nbytes / prof.mem_bw
        return max(f, m) if self.overlap else f + m

    def without_latency(self):
        """The same deployment on links with no latency and no jitter (bandwidth only)."""
        flat = {"latency_ms": 0.0, "jitter_ms": 0.0}
        return replace(self, device_link=self.device_link.model_copy(update=flat),
                       cloud_link=self.cloud_link.model_copy(update=flat))


def pass_seconds(cost, setup, streamed=False):
    """-> {device, cloud, link, total} seconds of one pass.

    ``streamed`` (cloud-only decode): tokens are pipelined -- the token's download overlaps
    the next token's compute and latency is paid once per stream, so a token costs the
    slower of compute and serialization.
    """
    dev = setup.side_seconds(cost.device_flops, cost.device_bytes, setup.device)
    if setup.cloud_tps and cost.decode and cost.cloud_flops:
        cld = cost.tokens / setup.cloud_tps + setup.side_seconds(
            cost.cloud_adapter_flops, cost.cloud_adapter_bytes, setup.cloud)
    else:
        cld = setup.side_seconds(cost.cloud_flops, cost.cloud_bytes, setup.cloud)
    parts = [setup.message_seconds(src, dst, n) for src, dst, n in cost.messages]
    ser, lat = sum(p[0] for p in parts), sum(p[1] for p in parts)
    link = ser + lat
    total = max(dev + cld, ser) if streamed else dev + cld + link
    return {"device": dev, "cloud": cld, "link": link, "total": total}


def generation_seconds(s, scheme, setup, prompt_len, tokens, step=0, **kw):
    """Time to generate ``tokens`` tokens from a ``prompt_len`` prompt: one prefill pass, then
    ``tokens - 1`` decode passes -- exactly the schedule of the PrivateLoRA protocol."""
    total, start, q = 0.0, 0, prompt_len
    for _ in range(tokens):
        cost = pass_cost(s, scheme, q, start + q, step=step, start=start, **kw)
        total += pass_seconds(cost, setup)["total"]
        start, q = start + q, 1
    return total


def memory_breakdown(s, scheme, r_c2d=64, r_d2c=None, kv_len=0, batch=1, weight_bits=None):
    """Bytes the device holds to serve, by part: ``embedding`` table, ``lm_head``, ``M``,
    ``A_B`` (full-hidden split only: the adapters live on the device), ``decoder`` (device-only
    weights of the layers and final norm), ``kv_cache``; ``total`` sums them and ``paper`` is
    the PrivateLoRA paper's convention (LM head + M; device-only: its weights, no KV)."""
    r_d2c = r_d2c or r_c2d
    b = s.dtype_bytes
    wb = b if weight_bits is None or scheme != "device_only" else weight_bits / 8
    parts = dict.fromkeys(("embedding", "lm_head", "M", "A_B", "decoder", "kv_cache"), 0.0)
    if scheme != "cloud_only":
        parts["embedding"] = parts["lm_head"] = s.vocab * s.d * wb
    if scheme == "device_only":
        parts["decoder"] = (s.layers * s.layer_params + s.norm_params) * wb
        parts["kv_cache"] = batch * s.layers * s.kv_bytes(kv_len)
    elif scheme in ("privatelora", "full_hidden"):
        parts["M"] = s.layers * len(s.dims) * r_c2d * r_d2c * b
        if scheme == "full_hidden":
            parts["A_B"] = s.layers * sum(s.d * r_c2d + r_d2c * w for w in s.dims.values()) * b
    parts["total"] = sum(parts.values())
    parts["paper"] = parts["lm_head"] + parts["M"] + parts["A_B"] + parts["decoder"] \
        + (parts["embedding"] if scheme == "device_only" else 0)
    return parts


def device_memory(s, scheme, r_c2d=64, r_d2c=None, kv_len=0, batch=1, weight_bits=None):
    """Bytes the device must hold to serve (weights, KV cache; no activations)."""
    return memory_breakdown(s, scheme, r_c2d, r_d2c, kv_len, batch, weight_bits)["total"]


def evaluate(s, setup, prompt_len=512, r_c2d=64, r_d2c=None, count_attention=True, batch=1,
             weight_bits=None, framing=True, ends=True):
    """Prefill and decode throughput of every scheme (tokens/s over all ``batch`` sequences).
    Returns {scheme: dict}."""
    out = {}
    for scheme in SCHEMES:
        kw = dict(r_c2d=r_c2d, r_d2c=r_d2c, count_attention=count_attention, batch=batch,
                  weight_bits=weight_bits, framing=framing, ends=ends)
        pre = pass_seconds(pass_cost(s, scheme, prompt_len, prompt_len, **kw), setup)
        dcost = pass_cost(s, scheme, 1, prompt_len + 1, start=prompt_len, **kw)
        dec = pass_seconds(dcost, setup, streamed=scheme == "cloud_only")
        mem = memory_breakdown(s, scheme, r_c2d, r_d2c, prompt_len + 1, batch, weight_bits)
        wire = sum(n for _, _, n in dcost.messages) / batch
        payload = sum(dcost.payload) / batch
        out[scheme] = {
            "prefill_tokens_per_s": batch * prompt_len / pre["total"], "prefill_s": pre,
            "decode_tokens_per_s": batch / dec["total"], "decode_s": dec,
            "decode_bytes_per_token": wire if batch > 1 else int(wire),
            "decode_payload_bytes_per_token": payload if batch > 1 else int(payload),
            "decode_framing_bytes_per_token": wire - payload if batch > 1 else int(wire - payload),
            "decode_messages_per_token": len(dcost.messages),
            "device_memory": mem["total"], "device_memory_breakdown": mem,
            "fits_device": mem["total"] <= setup.device.memory,
        }
    return out
