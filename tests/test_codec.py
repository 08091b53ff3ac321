"""The wire codec: bit-exact round trips and exact sizes."""
import json
import struct

import pytest
import torch

from testbed.engine import codec
from testbed.engine.codec import Message, decode, encode, header_size
from testbed.errors import TransportError

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
              torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def _sample(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g).to(dtype)
        t.view(-1)[:3] = torch.tensor([float("inf"), float("-inf"), -0.0]).to(dtype)
        return t
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -2**31), min(info.max, 2**31 - 1), shape, generator=g,
                         dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_round_trip_is_bit_exact(dtype):
    t = _sample(dtype, (3, 5, 7), 0)
    out = decode(encode(Message("x", tensors={"t": t}))).tensors["t"]
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out.view(torch.uint8) if dtype != torch.bool else out,
                       t.view(torch.uint8) if dtype != torch.bool else t)


def test_nan_payload_bits_survive():
    t = torch.tensor([float("nan"), 1.0])
    out = decode(encode(Message("x", tensors={"t": t}))).tensors["t"]
    assert torch.equal(out.view(torch.int32), t.view(torch.int32))


def test_size_is_header_plus_tensor_bytes():
    tensors = {"a": torch.zeros(4, 8), "b": torch.zeros(3, dtype=torch.bfloat16),
               "c": torch.zeros(2, 2, dtype=torch.int64), "empty": torch.zeros(0, 5)}
    msg = Message("moe_fwd", src="party-0", dst="party-1", step=7, meta={"layer": 1}, tensors=tensors)
    data = encode(msg)
    hlen = struct.unpack(">I", data[:4])[0]
    assert header_size(data) == 4 + hlen
    assert len(data) == 4 + hlen + 4 * 8 * 4 + 3 * 2 + 4 * 8
    back = decode(data)
    assert list(back.tensors) == ["a", "b", "c", "empty"]
    assert (back.kind, back.src, back.dst, back.step, back.meta) == ("moe_fwd", "party-0", "party-1", 7, {"layer": 1})
    assert back.tensors["empty"].shape == (0, 5)


def test_non_contiguous_tensor_is_sent_in_c_order():
    t = torch.arange(12.0).view(3, 4).t()
    assert torch.equal(decode(encode(Message("x", tensors={"t": t}))).tensors["t"], t)


def test_decoded_tensor_does_not_share_memory_with_sender():
    t = torch.ones(4)
    out = decode(encode(Message("x", tensors={"t": t}))).tensors["t"]
    out += 1
    assert torch.equal(t, torch.ones(4))


def test_rejects_tensor_that_requires_grad():
    with pytest.raises(TransportError, match="requires grad"):
        encode(Message("x", tensors={"w": torch.ones(2, requires_grad=True)}))


@pytest.mark.parametrize("bad,reason", [
    (b"\x00\x00", "truncated"),
    (b"\x00\x00\x00\x10{}", "does not fit"),
    (struct.pack(">I", 2) + b"{]", "malformed"),
])
def test_malformed_input_is_rejected_with_reason(bad, reason):
    with pytest.raises(TransportError, match=reason):
        decode(bad)


def test_truncated_body_and_oversize_rejected():
    data = encode(Message("x", tensors={"t": torch.zeros(16)}))
    with pytest.raises(TransportError, match="do not match"):
        decode(data[:-4])
    with pytest.raises(TransportError, match="exceeds the limit"):
        decode(data, max_bytes=len(data) - 1)


def test_unknown_dtype_in_header_rejected():
    header = json.dumps({"kind": "x", "src": "", "dst": "", "step": 0, "meta": {},
                         "tensors": [{"name": "t", "dtype": "object", "shape": [1],
                                      "offset": 0, "nbytes": 8}]}).encode()
    with pytest.raises(TransportError, match="unknown dtype"):
        decode(struct.pack(">I", len(header)) + header + bytes(8))


def test_dtype_table_covers_every_name():
    for name, dt in codec.DTYPES.items():
        assert codec.DTYPE_NAMES[dt] == name


def test_compact_header_is_small_and_the_json_header_still_decodes():
    t = {p: torch.zeros(1, 1, 64, dtype=torch.bfloat16) for p in "qkv"}
    meta = {"layer": 31, "projections": ["q", "k", "v"], "rank": 64, "direction": "c2d", "phase": "fwd",
            "mode": "generate", "party": "party-0", "split": "lowrank", "quantity": "A_x"}
    msg = Message("act_down", src="cloud", dst="party-0", step=-1, meta=meta, tensors=t)
    data = encode(msg)
    # version, 3 short strings, zigzag step, 3 tensors of (name, dtype, ndim, 3 one-byte dims)
    envelope = 1 + (1 + 8) + (1 + 5) + (1 + 7) + 1 + 1 + 3 * (2 + 1 + 1 + 3)
    short = {"a": 31, "b": ["q", "k", "v"], "c": 64, "d": "c2d", "e": "fwd", "f": "generate", "g": "party-0",
             "h": "lowrank", "i": "A_x"}
    meta_bytes = 1 + len(json.dumps(short, separators=(",", ":"), sort_keys=True))
    assert header_size(data) == 4 + envelope + meta_bytes
    assert len(data) == header_size(data) + 3 * 64 * 2
    back = decode(data)
    assert (back.kind, back.src, back.dst, back.step, back.meta) == ("act_down", "cloud", "party-0", -1, meta)
    # a meta with a one-letter key of its own is sent as is, and comes back unchanged
    odd = {"a": 1, "layer": 2}
    assert decode(encode(Message("x", meta=odd))).meta == odd
    # the first format (JSON header with offsets) is still read
    legacy = json.dumps({"kind": "x", "src": "a", "dst": "b", "step": 3, "meta": {"layer": 1},
                         "tensors": [{"name": "t", "dtype": "int16", "shape": [2], "offset": 0,
                                      "nbytes": 4}]}).encode()
    back = decode(struct.pack(">I", len(legacy)) + legacy + bytes(4))
    assert back.meta == {"layer": 1} and back.tensors["t"].shape == (2,)
    # a binary header whose tensors do not add up to the body is rejected
    with pytest.raises(TransportError, match="do not match"):
        decode(data + b"\0")
