"""The wire codec: one message = JSON header + raw tensor bytes. Never pickle.

Frame layout (what :func:`encode` returns)::

    u32 big-endian header length | header (UTF-8 JSON) | tensor bytes, concatenated

The header lists each tensor's name, dtype, shape, offset and byte length, so a
message's encoded size is exactly ``4 + len(header) + sum(tensor bytes)``.  The
container transport wraps these bytes in an authenticated frame; the embedded engine
passes every message through encode -> bytes -> decode so byte counts are real.
"""
import json
import struct
from dataclasses import dataclass, field

import torch

from testbed.errors import TransportError

DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {v: torch.empty((), dtype=v).element_size() for v in DTYPES.values()}
MAX_HEADER = 1 << 20


@dataclass
class Message:
    """A protocol message: a kind, JSON-able metadata and named detached tensors."""

    kind: str
    src: str = ""
    dst: str = ""
    step: int = -1
    meta: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)

    def tensor_bytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def tensor_to_bytes(t):
    """Raw little-endian bytes of a tensor (any supported dtype), C order."""
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(buf, dtype, shape):
    """Inverse of :func:`tensor_to_bytes`; returns a tensor that owns its memory."""
    if len(buf) == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def encode(msg):
    """Message -> bytes (header length, JSON header, raw tensor bytes)."""
    return bytes(encode_buffer(msg))


def encode_buffer(msg):
    """:func:`encode` into a ``bytearray``, each tensor's bytes copied once into place
    (the engine decodes from it without another copy)."""
    entries, flat, offset = [], [], 0
    for name, t in msg.tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TransportError(f"message {msg.kind!r}: tensor {name!r} is {type(t).__name__}, "
                                 "expected torch.Tensor")
        if t.requires_grad:
            raise TransportError(f"message {msg.kind!r}: tensor {name!r} requires grad; "
                                 "send detached tensors only")
        if t.dtype not in DTYPE_NAMES:
            raise TransportError(f"message {msg.kind!r}: tensor {name!r} has unsupported dtype {t.dtype}")
        u8 = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8) if t.numel() else None
        nbytes = 0 if u8 is None else u8.numel()
        entries.append({"name": name, "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "offset": offset, "nbytes": nbytes})
        flat.append(u8)
        offset += nbytes
    header = json.dumps({"kind": msg.kind, "src": msg.src, "dst": msg.dst, "step": msg.step,
                         "meta": msg.meta, "tensors": entries},
                        separators=(",", ":"), sort_keys=True).encode()
    start = 4 + len(header)
    buf = bytearray(start + offset)
    buf[:4] = struct.pack(">I", len(header))
    buf[4:start] = header
    if offset:
        body = torch.frombuffer(buf, dtype=torch.uint8, offset=start, count=offset)
        for e, u8 in zip(entries, flat):
            if u8 is not None:
                body[e["offset"]:e["offset"] + e["nbytes"]].copy_(u8)
    return buf


def header_size(data):
    """Bytes taken by the length prefix and the JSON header of an encoded message."""
    return 4 + struct.unpack(">I", data[:4])[0]


def decode(data, max_bytes=None):
    """bytes -> Message. Raises TransportError naming what is wrong; never executes data."""
    if max_bytes is not None and len(data) > max_bytes:
        raise TransportError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < 4:
        raise TransportError(f"message truncated: {len(data)} bytes, need at least 4")
    (hlen,) = struct.unpack(">I", data[:4])
    if hlen > MAX_HEADER or 4 + hlen > len(data):
        raise TransportError(f"message header length {hlen} does not fit in {len(data)} bytes")
    try:
        h = json.loads(data[4:4 + hlen].decode())
        body = memoryview(data)[4 + hlen:]
        tensors = {}
        for e in h["tensors"]:
            dtype = DTYPES.get(e["dtype"])
            if dtype is None:
                raise TransportError(f"tensor {e['name']!r}: unknown dtype {e['dtype']!r}")
            shape = [int(s) for s in e["shape"]]
            n = 1
            for s in shape:
                n *= s
            expect = n * ITEMSIZE[dtype]
            off, nb = int(e["offset"]), int(e["nbytes"])
            if nb != expect or off < 0 or off + nb > len(body):
                raise TransportError(f"tensor {e['name']!r}: {nb} bytes at {off} do not match "
                                     f"shape {shape} {e['dtype']} in a {len(body)}-byte body")
            tensors[e["name"]] = tensor_from_bytes(body[off:off + nb], dtype, shape)
        return Message(kind=h["kind"], src=h["src"], dst=h["dst"], step=int(h["step"]),
                       meta=h["meta"], tensors=tensors)
    except TransportError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise TransportError(f"malformed message header: {exc}") from None
