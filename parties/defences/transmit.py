"""Defences on what a role sends: noise, clipped noise, quantization, top-k sparsification.

Each is a transform on an outgoing message's tensors, applied by the role wrapper in
:mod:`parties.defences` before the engine encodes the message -- so the wire, the byte
counts and the capture all see the defended tensors:

* ``noise`` (``sigma``): ``t + sigma * N(0, 1)`` drawn from a torch.Generator seeded per
  role.  Noise is drawn per message, so noising a broadcast (e.g. FedSGD's ``update``)
  gives every receiver a different copy and their models drift apart -- list only the
  kinds meant.
* ``clip_noise`` (``sigma``, ``clip``): every row (the last dimension) is clipped to L2
  norm ``clip``, then ``N(0, (sigma * clip)^2 / d)`` is added per coordinate, so the
  noise's norm is about ``sigma`` times the clipped row's bound whatever the layer's
  scale -- sigma is a noise-to-signal ratio that means the same at every layer.  With
  ``clip: 0`` the bound is each row's own norm (no clipping; noise relative to the row).
  The calibrated activation noise of the split-learning defences (e.g. the Gaussian
  mechanism on clipped activations in Split-and-Denoise, Mai et al., ICML 2024,
  arXiv 2310.09130).
* ``quantize`` ``bf16`` / ``fp16``: a cast (2 bytes per element); ``int8``: symmetric
  per-tensor, ``scale = max|t| / 127``, ``q = round(t / scale)`` as int8, plus the
  float32 scalar ``<name>.scale``: a tensor of N elements costs N + 4 bytes.
* ``topk`` (``fraction``): gradient pruning / top-k sparsification (Zhu et al., "Deep
  Leakage from Gradients", NeurIPS 2019, arXiv 1906.08935, section 5): only the
  ``ceil(fraction * N)`` entries of largest magnitude of each tensor are sent, as their
  values (``<name>``) and flat int32 positions (``<name>.idx``): ``k * (e + 4)`` bytes
  for element size ``e`` instead of ``N * e``.

Quantized and sparsified tensors are listed in the message meta (``quantized`` /
``sparse``) and every applied defence in ``defences``; the receiver's wrapper undoes the
encoding (:func:`parties.defences.restore`) before the role sees the message.
"""
import math

import torch

from testbed.engine.codec import DTYPE_NAMES, Message

QUANTIZED = "quantized"   # meta key: tensor name -> {"bits": ..., "dtype": original dtype}
SPARSE = "sparse"         # meta key: tensor name -> {"shape": [...]} (values + ".idx" positions)
APPLIED = "defences"      # meta key: list of the defences applied, in order
WIRE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
INT8_MAX = 127


def quantize_int8(t):
    """Symmetric per-tensor int8: returns (q int8, scale float32 scalar); t ~= q * scale."""
    amax = t.detach().abs().amax().float() if t.numel() else torch.zeros((), device=t.device)
    scale = amax / INT8_MAX if amax > 0 else torch.ones((), device=t.device)
    q = torch.round(t.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale.reshape(()).to(torch.float32)


def _is_float(t):
    return t.is_floating_point()


class Defence:
    """One transform on outgoing messages of the listed kinds."""

    def __init__(self, cfg):
        self.cfg = cfg

    def applies(self, kind):
        return not self.cfg.kinds or kind in self.cfg.kinds

    def __call__(self, msg):
        raise NotImplementedError


class GaussianNoise(Defence):
    """Adds N(0, sigma^2) to every float tensor not already quantized."""

    def __init__(self, cfg, generator):
        super().__init__(cfg)
        self.gen = generator

    def __call__(self, msg):
        skip = msg.meta.get(QUANTIZED, {})
        out = {}
        for name, t in msg.tensors.items():
            if _is_float(t) and name not in skip and not name.endswith(".scale"):
                noise = torch.randn(t.shape, generator=self.gen, dtype=torch.float32)
                t = (t.float() + self.cfg.sigma * noise.to(t.device)).to(t.dtype)
            out[name] = t
        meta = {**msg.meta, APPLIED: msg.meta.get(APPLIED, []) + [{"type": "noise",
                                                                    "sigma": self.cfg.sigma}]}
        return Message(kind=msg.kind, step=msg.step, meta=meta, tensors=out)


class Quantize(Defence):
    """Casts (bf16/fp16) or int8-quantizes every float tensor not already quantized."""

    def __call__(self, msg):
        bits = self.cfg.bits
        done = dict(msg.meta.get(QUANTIZED, {}))
        out = {}
        for name, t in msg.tensors.items():
            if not _is_float(t) or name in done or name.endswith(".scale"):
                out[name] = t
                continue
            done[name] = {"bits": bits, "dtype": DTYPE_NAMES[t.dtype]}
            if bits == "int8":
                out[name], out[f"{name}.scale"] = quantize_int8(t)
            else:
                out[name] = t.to(WIRE_DTYPES[bits])
        meta = {**msg.meta, QUANTIZED: done,
                APPLIED: msg.meta.get(APPLIED, []) + [{"type": "quantize", "bits": bits}]}
        return Message(kind=msg.kind, step=msg.step, meta=meta, tensors=out)


def _applied(msg, entry):
    return msg.meta.get(APPLIED, []) + [entry]


class ClipNoise(Defence):
    """Clips every row of every float tensor to L2 norm ``clip`` (0: the row's own norm),
    then adds ``N(0, (sigma * bound)^2 / d)`` per coordinate (``d`` = row length)."""

    def __init__(self, cfg, generator):
        super().__init__(cfg)
        self.gen = generator

    def __call__(self, msg):
        skip = {**msg.meta.get(QUANTIZED, {}), **msg.meta.get(SPARSE, {})}
        out = {}
        for name, t in msg.tensors.items():
            if _is_float(t) and name not in skip and t.numel() and t.dim() >= 1:
                out[name] = clip_noise(t, self.cfg.sigma, self.cfg.clip, self.gen)
            else:
                out[name] = t
        meta = {**msg.meta, APPLIED: _applied(msg, {"type": "clip_noise", "sigma": self.cfg.sigma,
                                                    "clip": self.cfg.clip})}
        return Message(kind=msg.kind, step=msg.step, meta=meta, tensors=out)


def clip_noise(t, sigma, clip, gen):
    """``t`` with rows clipped to norm ``clip`` (0: unclipped) plus noise of norm ~ sigma x bound."""
    rows = t.detach().float().reshape(-1, t.shape[-1])
    norms = rows.norm(dim=1, keepdim=True)
    if clip > 0:
        rows = rows * torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)
        bound = torch.full_like(norms, clip)
    else:
        bound = norms
    noise = torch.randn(rows.shape, generator=gen, dtype=torch.float32).to(rows.device)
    rows = rows + noise * (sigma * bound / rows.shape[1] ** 0.5)
    return rows.reshape(t.shape).to(t.dtype)


class TopK(Defence):
    """Sends only the ``ceil(fraction * N)`` largest-magnitude entries of each float tensor."""

    def __call__(self, msg):
        done = dict(msg.meta.get(SPARSE, {}))
        quantized = msg.meta.get(QUANTIZED, {})
        out = {}
        for name, t in msg.tensors.items():
            if not _is_float(t) or name in done or name in quantized or name.endswith((".scale", ".idx")):
                out[name] = t
                continue
            values, idx = top_k(t, self.cfg.fraction)
            done[name] = {"shape": list(t.shape)}
            out[name], out[f"{name}.idx"] = values, idx
        meta = {**msg.meta, SPARSE: done,
                APPLIED: _applied(msg, {"type": "topk", "fraction": self.cfg.fraction})}
        return Message(kind=msg.kind, step=msg.step, meta=meta, tensors=out)


def top_k(t, fraction):
    """(values, int32 flat positions) of the ``ceil(fraction * numel)`` largest |t|, positions ascending."""
    flat = t.detach().reshape(-1)
    k = min(flat.numel(), max(1, math.ceil(fraction * flat.numel()))) if flat.numel() else 0
    idx = torch.topk(flat.abs().float(), k, sorted=False).indices.sort().values
    return flat[idx].clone(), idx.to(torch.int32)


def densify(values, idx, shape, dtype):
    """The dense tensor of ``shape`` with ``values`` at flat positions ``idx``, zeros elsewhere."""
    out = torch.zeros(math.prod(shape), dtype=dtype, device=values.device)
    out[idx.long()] = values.to(dtype)
    return out.reshape(shape)

