"""Defences, registered by name; a scenario lists them and the runner applies them.

    defences:
      - {type: noise, sigma: 0.1, kinds: [act]}          # on what a role sends
      - {type: clip_noise, sigma: 0.5, clip: 0, kinds: [expert_fwd]}
      - {type: quantize, bits: int8, kinds: [act, grad]}
      - {type: topk, fraction: 0.1, kinds: [grad]}
      - {type: secagg}                                    # FedAvg / FedSGD option
      - {type: santext, epsilon: 8}                       # the parties' text, before training
      - {type: dp_sgd, noise_multiplier: 1.0, max_grad_norm: 1.0}

Three kinds of defence, each where it acts:

* on what a role sends (:data:`TRANSMIT`, :mod:`.transmit`): the runner wraps every role
  (:func:`wrap_roles`); each ``Send`` whose kind is listed (empty ``kinds``: every kind)
  is transformed in the order listed, before the engine encodes it, so the wire, the
  byte counts and the capture see the defended tensors in both engines.  The receiving
  role's wrapper undoes encodings (:func:`restore`) so protocols never know;
* protocol options that change what is computed: ``dp_sgd`` (:mod:`parties.federated.dp`)
  and ``secagg`` (:mod:`.secagg`), read by the protocols that support them;
* on the data (:data:`DATA`): ``santext`` (:mod:`.santext`) replaces each party's
  training tokens before any protocol sees them.
"""
import logging

import torch

from testbed.engine.codec import DTYPES, Message
from testbed.engine.effects import Send
from testbed.errors import ConfigError

from .transmit import (APPLIED, QUANTIZED, SPARSE, ClipNoise, GaussianNoise, Quantize,  # noqa: F401
                       TopK, densify, quantize_int8)

log = logging.getLogger(__name__)

# type -> (class, whether it draws random numbers)
TRANSMIT = {"noise": (GaussianNoise, True), "clip_noise": (ClipNoise, True),
            "quantize": (Quantize, False), "topk": (TopK, False)}
PROTOCOL_OPTIONS = ("dp_sgd", "secagg")
DATA = ("santext",)
TYPES = tuple(TRANSMIT) + PROTOCOL_OPTIONS + DATA


def restore(msg):
    """A received message as the sender's role produced it: int8/bf16/fp16 tensors back in
    their original dtype (``q * scale`` for int8; ``.scale`` tensors dropped), sparse
    tensors back to dense (zeros where nothing was sent; ``.idx`` tensors dropped).
    Messages without either meta entry are returned as they are.  Attacks reading the
    capture use this to see what the receiver saw."""
    quantized, sparse = msg.meta.get(QUANTIZED), msg.meta.get(SPARSE)
    if not quantized and not sparse:
        return msg
    tensors = dict(msg.tensors)
    for name, q in (quantized or {}).items():
        dtype = DTYPES[q["dtype"]]
        if q["bits"] == "int8":
            scale = tensors.pop(f"{name}.scale")
            tensors[name] = (tensors[name].to(torch.float32) * scale).to(dtype)
        else:
            tensors[name] = tensors[name].to(dtype)
    for name, s in (sparse or {}).items():
        values = tensors[name]
        tensors[name] = densify(values, tensors.pop(f"{name}.idx"), s["shape"], values.dtype)
    meta = {k: v for k, v in msg.meta.items() if k not in (QUANTIZED, SPARSE)}
    return Message(kind=msg.kind, src=msg.src, dst=msg.dst, step=msg.step, meta=meta, tensors=tensors)


def restore_tensor(meta, name, fetch):
    """What the receiver saw of one tensor ``name`` of a message with ``meta``; ``fetch(n)``
    returns the message's raw tensor ``n`` (lazily: only the tensors needed are read)."""
    q = (meta.get(QUANTIZED) or {}).get(name)
    s = (meta.get(SPARSE) or {}).get(name)
    t = fetch(name)
    if q is not None:
        dtype = DTYPES[q["dtype"]]
        t = (t.to(torch.float32) * fetch(f"{name}.scale")).to(dtype) if q["bits"] == "int8" else t.to(dtype)
    if s is not None:
        t = densify(t, fetch(f"{name}.idx"), s["shape"], t.dtype)
    return t


def encoded_extras(meta):
    """Names of the helper tensors an encoding added (``.scale``, ``.idx``)."""
    return {f"{n}.scale" for n, q in (meta.get(QUANTIZED) or {}).items() if q["bits"] == "int8"} | \
        {f"{n}.idx" for n in (meta.get(SPARSE) or {})}


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
    """The transmission defences of a scenario for one role, in the order listed."""
    out = []
    for i, cfg in enumerate(defences):
        if cfg.type in TRANSMIT:
            cls, random = TRANSMIT[cfg.type]
            out.append(cls(cfg, ctx.generator(role, f"defence-{i}-{cfg.type}")) if random else cls(cfg))
    return out


def describe(cfg):
    """``noise(sigma=0.1) on act`` -- one defence entry in words, for logs and errors."""
    fields = {k: v for k, v in cfg.model_dump().items() if k not in ("type", "kinds")}
    keep = {"noise": ("sigma",), "clip_noise": ("sigma", "clip"), "quantize": ("bits",),
            "topk": ("fraction",), "secagg": ("frac_bits",), "santext": ("epsilon",),
            "dp_sgd": ("noise_multiplier", "max_grad_norm", "delta")}.get(cfg.type, ())
    args = ", ".join(f"{k}={fields[k]}" for k in keep)
    return f"{cfg.type}({args})" + (f" on {', '.join(cfg.kinds)}" if cfg.kinds else "")


def check_supported(protocol, defences):
    """ConfigError when the scenario's protocol cannot apply a protocol-option defence."""
    supported = set(getattr(protocol, "defence_options", ()))
    problems = [f"{i}.type: {d.type!r} is not supported by protocol {protocol.name!r}"
                f"{' (supported: ' + ', '.join(sorted(supported)) + ')' if supported else ''}"
                for i, d in enumerate(defences) if d.type == "secagg" and d.type not in supported]
    if problems:
        raise ConfigError("defences", problems)


def wrap_roles(roles, defences, ctx):
    """Wrap every role generator with the scenario's transmission defences."""
    if not any(d.type in TRANSMIT for d in defences):
        return roles
    log.info("%s: transmission defences %s", ctx.protocol_name,
             [describe(d) for d in defences if d.type in TRANSMIT])
    return {role: wrap_role(gen, build_defences(role, defences, ctx)) for role, gen in roles.items()}
