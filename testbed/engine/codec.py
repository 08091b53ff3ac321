"""The wire codec: one message = compact binary header + raw tensor bytes. Never pickle.

Frame layout (what :func:`encode` returns)::

    u32 big-endian header length | header | tensor bytes, concatenated

The header (:func:`build_header`) is binary, so that framing stays a small part of a
low-rank message (a PrivateLoRA A·x of one token is 384 bytes)::

    u8 version (0xC1)
    kind, src, dst            each u8 length + UTF-8
    step                      zigzag varint
    u8 tensor count, then per tensor: name (u8 length + UTF-8), u8 dtype code
                              (index in DTYPES), u8 ndim, each dimension as a varint
    meta                      the rest: compact JSON whose top-level keys listed in
                              META_KEYS are written as their one-letter code (a meta
                              with a one-letter key of its own is written as is; the
                              first byte says which), nothing for an empty meta

Tensors follow in order, each ``numel * element size`` bytes, so a message's encoded size
is exactly ``4 + len(header) + sum(tensor bytes)``.  :func:`decode` also reads the JSON
header of the first format (``{"kind":...,"tensors":[{name, dtype, shape, offset, nbytes}]}``).
The container transport wraps these bytes in an authenticated frame; the embedded engine
passes every message through encode -> bytes -> decode so byte counts are real.
"""
import json
import math
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
DTYPE_CODES = list(DTYPES)          # wire code = index; append only
MAX_HEADER = 1 << 20
VERSION = 0xC1
# Metadata keys the protocols send on every message, written as one letter (code = position
# in this tuple, as a letter a..z then A..Z).  Append only: the position is the wire format.
META_KEYS = ("layer", "projections", "rank", "direction", "phase", "mode", "party", "split",
             "quantity", "position", "experts", "counts", "origin", "host", "round", "n_samples",
             "local_steps", "eval", "token", "quantized", "defences", "bits", "dtype", "scale")
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_SHORT = {k: _LETTERS[i] for i, k in enumerate(META_KEYS)}
_LONG = {v: k for k, v in _SHORT.items()}


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


def _varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _short_str(text, what):
    b = text.encode()
    if len(b) > 255:
        raise TransportError(f"{what} {text[:40]!r}... is {len(b)} bytes; the header allows 255")
    return bytes([len(b)]) + b


def _meta_bytes(meta):
    if not meta:
        return b""
    plain = any(len(k) == 1 for k in meta)      # would collide with the one-letter codes
    body = meta if plain else {_SHORT.get(k, k): v for k, v in meta.items()}
    return (b"J" if plain else b"K") + json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def build_header(kind, src, dst, step, meta, tensors):
    """The binary header of a message; ``tensors``: [(name, dtype name, shape)] in order."""
    out = bytearray([VERSION])
    for what, text in (("kind", kind), ("src", src), ("dst", dst)):
        out += _short_str(text, what)
    out += _varint((step << 1) ^ (step >> 63))
    if len(tensors) > 255:
        raise TransportError(f"message {kind!r}: {len(tensors)} tensors; the header allows 255")
    out.append(len(tensors))
    for name, dtype, shape in tensors:
        if len(shape) > 255:
            raise TransportError(f"message {kind!r}: tensor {name!r} has {len(shape)} dimensions")
        out += _short_str(name, "tensor name") + bytes([DTYPE_CODES.index(dtype), len(shape)])
        for d in shape:
            out += _varint(int(d))
    out += _meta_bytes(meta)
    return bytes(out)


def encode(msg):
    """Message -> bytes (header length, binary header, raw tensor bytes)."""
    specs, chunks = [], []
    for name, t in msg.tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TransportError(f"message {msg.kind!r}: tensor {name!r} is {type(t).__name__}, "
                                 "expected torch.Tensor")
        if t.requires_grad:
            raise TransportError(f"message {msg.kind!r}: tensor {name!r} requires grad; "
                                 "send detached tensors only")
        if t.dtype not in DTYPE_NAMES:
            raise TransportError(f"message {msg.kind!r}: tensor {name!r} has unsupported dtype {t.dtype}")
        specs.append((name, DTYPE_NAMES[t.dtype], list(t.shape)))
        chunks.append(tensor_to_bytes(t))
    header = build_header(msg.kind, msg.src, msg.dst, msg.step, msg.meta, specs)
    return struct.pack(">I", len(header)) + header + b"".join(chunks)


def header_size(data):
    """Bytes taken by the length prefix and the header of an encoded message."""
    return 4 + struct.unpack(">I", data[:4])[0]


class _Reader:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, n):
        if self.pos + n > len(self.buf):
            raise TransportError(f"header truncated: need {n} bytes at {self.pos} of {len(self.buf)}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def byte(self):
        return self.take(1)[0]

    def varint(self):
        n, shift = 0, 0
        while True:
            b = self.byte()
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
            if shift > 63:
                raise TransportError("header varint longer than 64 bits")

    def text(self):
        return bytes(self.take(self.byte())).decode()


def _parse_binary(head):
    """-> (kind, src, dst, step, meta, [(name, dtype, shape)])."""
    r = _Reader(head)
    r.byte()
    kind, src, dst = r.text(), r.text(), r.text()
    z = r.varint()
    step = (z >> 1) ^ -(z & 1)
    specs = []
    for _ in range(r.byte()):
        name, code, ndim = r.text(), r.byte(), r.byte()
        if code >= len(DTYPE_CODES):
            raise TransportError(f"tensor {name!r}: unknown dtype code {code}")
        specs.append((name, DTYPE_CODES[code], [r.varint() for _ in range(ndim)]))
    rest = bytes(head[r.pos:])
    meta = {}
    if rest:
        if rest[:1] not in (b"J", b"K"):
            raise TransportError(f"meta: unknown encoding {rest[:1]!r}")
        meta = json.loads(rest[1:].decode())
        if not isinstance(meta, dict):
            raise TransportError("meta: not a JSON object")
        if rest[:1] == b"K":
            meta = {_LONG.get(k, k): v for k, v in meta.items()}
    return kind, src, dst, step, meta, specs


def _parse_json(head):
    """The first format's JSON header (offsets and byte counts checked by the caller)."""
    h = json.loads(bytes(head).decode())
    specs = []
    for e in h["tensors"]:
        if e["dtype"] not in DTYPES:
            raise TransportError(f"tensor {e['name']!r}: unknown dtype {e['dtype']!r}")
        specs.append((e["name"], e["dtype"], [int(x) for x in e["shape"]], int(e["offset"]), int(e["nbytes"])))
    return h["kind"], h["src"], h["dst"], int(h["step"]), h["meta"], specs


def decode(data, max_bytes=None):
    """bytes -> Message. Raises TransportError naming what is wrong; never executes data."""
    if max_bytes is not None and len(data) > max_bytes:
        raise TransportError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < 4:
        raise TransportError(f"message truncated: {len(data)} bytes, need at least 4")
    (hlen,) = struct.unpack(">I", data[:4])
    if hlen > MAX_HEADER or 4 + hlen > len(data) or hlen == 0:
        raise TransportError(f"message header length {hlen} does not fit in {len(data)} bytes")
    try:
        head = memoryview(data)[4:4 + hlen]
        body = memoryview(data)[4 + hlen:]
        if head[0] == VERSION:
            kind, src, dst, step, meta, specs = _parse_binary(head)
            offset, placed = 0, []
            for name, dtype, shape in specs:
                n = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
                placed.append((name, dtype, shape, offset, n))
                offset += n
            if offset != len(body):
                raise TransportError(f"tensors of {offset} bytes do not match a {len(body)}-byte body")
        else:
            kind, src, dst, step, meta, placed = _parse_json(head)
        tensors = {}
        for name, dtype, shape, off, nb in placed:
            expect = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
            if nb != expect or off < 0 or off + nb > len(body):
                raise TransportError(f"tensor {name!r}: {nb} bytes at {off} do not match "
                                     f"shape {shape} {dtype} in a {len(body)}-byte body")
            tensors[name] = tensor_from_bytes(body[off:off + nb], DTYPES[dtype], shape)
        return Message(kind=kind, src=src, dst=dst, step=step, meta=meta, tensors=tensors)
    except TransportError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, IndexError) as exc:
        raise TransportError(f"malformed message header: {exc}") from None


def encode_buffer(msg):
    """:func:`encode` into a ``bytearray`` the engine can decode from in place."""
    return bytearray(encode(msg))
