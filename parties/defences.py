"""Transmission defences: Gaussian noise on, and quantization of, the tensors roles send.

A scenario lists them; the runner wraps every role with :func:`wrap_roles`::

    defences:
      - {type: noise, sigma: 0.1, kinds: [act]}      # add N(0, sigma^2) to float tensors
      - {type: quantize, bits: int8, kinds: [act, grad]}

A wrapped role runs unchanged.  Each ``Send`` whose message kind is listed (an empty
``kinds`` means every kind) has its floating-point tensors transformed, in the order
the defences are listed, before the engine encodes it -- so the wire, the byte counts
and the capture all see the defended tensors:

* ``noise``: ``t + sigma * N(0, 1)`` drawn from a torch.Generator seeded per role;
* ``quantize`` ``bf16`` / ``fp16``: a cast (2 bytes per element);
* ``quantize`` ``int8``: symmetric per-tensor, ``scale = max|t| / 127``,
  ``q = round(t / scale)`` as int8, plus the float32 scalar ``<name>.scale``: a tensor of
  N elements costs N + 4 bytes instead of 4N.

Quantized tensors are listed in the message meta (``quantized: {name: {bits, dtype}}``)
and every applied defence in ``defences``; the receiving role's wrapper dequantizes
(:func:`restore`) before the role sees the message, so protocols never know.  Noise is
drawn per message, so noising a broadcast (e.g. FedSGD's ``update``) gives every receiver
a different copy and their models drift apart -- list only the kinds meant.  Values the
engine sends back into the generator are forwarded unchanged otherwise.  ``dp_sgd``
entries are not handled here (protocols wrap their optimizers, see parties/federated/dp.py).
"""
import logging

import torch

from testbed.engine.codec import DTYPE_NAMES, DTYPES, Message
from testbed.engine.effects import Send

log = logging.getLogger(__name__)

QUANTIZED = "quantized"   # meta key: tensor name -> {"bits": ..., "dtype": original dtype}
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


def restore(msg):
    """A received message with its quantized tensors back in their original dtype.

    int8 tensors become ``q * scale`` and their ``.scale`` tensors are dropped; the
    ``quantized`` meta entry is removed.  Messages without it are returned as they are.
    Attacks reading the capture can use this to see what the receiver saw.
    """
    info = msg.meta.get(QUANTIZED)
    if not info:
        return msg
    tensors = dict(msg.tensors)
    for name, q in info.items():
        dtype = DTYPES[q["dtype"]]
        if q["bits"] == "int8":
            scale = tensors.pop(f"{name}.scale")
            tensors[name] = (tensors[name].to(torch.float32) * scale).to(dtype)
        else:
            tensors[name] = tensors[name].to(dtype)
    meta = {k: v for k, v in msg.meta.items() if k != QUANTIZED}
    return Message(kind=msg.kind, src=msg.src, dst=msg.dst, step=msg.step, meta=meta, tensors=tensors)


def wrap_role(gen, defences):
    """A generator that runs ``gen``, defending its sends and restoring its receives."""
    value = None
    while True:
        try:
            eff = gen.send(value)
        except StopIteration as stop:
            return stop.value
        if isinstance(eff, Send):
            msg = eff.message
            for d in defences:
                if d.applies(msg.kind):
                    msg = d(msg)
            eff = Send(eff.dst, msg)
        value = yield eff
        if isinstance(value, Message):
            value = restore(value)


def build_defences(role, defences, ctx):
    """The transmission defences of a scenario for one role (dp_sgd entries skipped)."""
    out = []
    for i, cfg in enumerate(defences):
        if cfg.type == "noise":
            out.append(GaussianNoise(cfg, ctx.generator(role, f"defence-{i}-noise")))
        elif cfg.type == "quantize":
            out.append(Quantize(cfg))
    return out


def wrap_roles(roles, defences, ctx):
    """Wrap every role generator with the scenario's noise/quantize defences."""
    if not any(d.type in ("noise", "quantize") for d in defences):
        return roles
    log.info("%s: transmission defences %s", ctx.protocol_name,
             [(d.type, d.sigma if d.type == "noise" else d.bits, d.kinds or "all") for d in defences
              if d.type != "dp_sgd"])
    return {role: wrap_role(gen, build_defences(role, defences, ctx)) for role, gen in roles.items()}
