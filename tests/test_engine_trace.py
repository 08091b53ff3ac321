"""SimPy-style trace tests of the embedded engine: exact (time, src, dst, bytes) sequences."""
import random

import pytest
import torch

from testbed.engine.codec import Message, encode
from testbed.engine.devices import resolve_device
from testbed.engine.effects import Compute, Log, Recv, Send
from testbed.engine.sim import SimEngine
from testbed.errors import ProtocolError
from testbed.scenario import LinkCfg

HOST = resolve_device("host")
A100 = resolve_device("a100")
L0 = LinkCfg(up_mbps=8, down_mbps=16, latency_ms=5)
L1 = LinkCfg(up_mbps=4, down_mbps=8, latency_ms=10)


def _size(kind, src, dst, n, step=0):
    return len(encode(Message(kind, src=src, dst=dst, step=step, tensors={"x": torch.zeros(n)})))


def _engine(compute="none", endpoints=None, logs=None):
    endpoints = endpoints or {"party-0": (HOST, L0), "party-1": (HOST, L1)}
    return SimEngine("test", endpoints, random.Random(0), on_log=(logs if logs is not None else []).append,
                     compute_mode=compute)


def test_ping_pong_trace_is_exact():
    def p0():
        yield Send("party-1", Message("ping", step=0, tensors={"x": torch.zeros(1000)}))
        reply = yield Recv(src="party-1", kind="pong")
        assert reply.tensors["x"].shape == (500,)

    def p1():
        msg = yield Recv(kind="ping")
        assert msg.src == "party-0" and msg.tensors["x"].shape == (1000,)
        yield Send("party-0", Message("pong", step=0, tensors={"x": torch.zeros(500)}))

    eng = _engine()
    eng.run({"party-0": p0(), "party-1": p1()})
    b_ping, b_pong = _size("ping", "party-0", "party-1", 1000), _size("pong", "party-1", "party-0", 500)
    t_ping = b_ping * 8 / 8e6 + 0.015            # min(8 up, 8 down) Mbit/s, 5 + 10 ms
    t_pong = t_ping + b_pong * 8 / 4e6 + 0.015   # min(4 up, 16 down)
    assert eng.trace == [(pytest.approx(t_ping, abs=1e-12), "party-0", "party-1", b_ping, "ping"),
                         (pytest.approx(t_pong, abs=1e-12), "party-1", "party-0", b_pong, "pong")]
    assert eng.bytes_sent == b_ping + b_pong
    assert eng.links["party-0"].bytes_up == b_ping and eng.links["party-0"].bytes_down == b_pong


def test_concurrent_sends_share_the_uplink_fifo():
    def p0():
        for i in range(3):
            yield Send("party-1", Message("m", step=i, tensors={"x": torch.zeros(2000)}))

    def p1():
        for _ in range(3):
            yield Recv()

    eng = _engine()
    eng.run({"party-0": p0(), "party-1": p1()})
    ser = _size("m", "party-0", "party-1", 2000) * 8 / 8e6
    assert [round(t, 12) for t, *_ in eng.trace] == [round(k * ser + 0.015, 12) for k in (1, 2, 3)]


def test_modelled_compute_advances_the_clock_on_the_device_profile():
    logs = []

    def p0():
        yield Compute(flops=312e12)               # one second on an A100
        yield Log({"event": "x"})
        yield Compute(seconds=0.5)
        yield Log({"event": "y"})

    eng = _engine(endpoints={"party-0": (A100, L0)}, logs=logs)
    eng.run({"party-0": p0()})
    assert [(r["event"], r["sim_time"]) for r in logs] == [("x", 1.0), ("y", 1.5)]
    assert logs[0]["protocol"] == "test" and logs[0]["role"] == "party-0"


def test_flops_mode_counts_matmul_flops():
    logs = []

    def p0():
        a, b = torch.ones(64, 128), torch.ones(128, 32)
        _ = a @ b
        yield Log({"event": "x"})

    eng = _engine(compute="flops", endpoints={"party-0": (A100, L0)}, logs=logs)
    eng.run({"party-0": p0()})
    assert logs[0]["sim_time"] == pytest.approx(2 * 64 * 128 * 32 / A100.flops)


def test_deadlock_names_the_waiting_role():
    def p0():
        yield Recv(kind="never")

    def p1():
        yield Log({"event": "idle"})

    with pytest.raises(ProtocolError, match="party-0 waits for Recv"):
        _engine().run({"party-0": p0(), "party-1": p1()})


def test_send_to_unknown_role_is_an_error():
    def p0():
        yield Send("nobody", Message("m"))

    with pytest.raises(ProtocolError, match="unknown role 'nobody'"):
        _engine().run({"party-0": p0()})


def test_loss_retransmits_and_jitter_delays():
    lossy = LinkCfg(up_mbps=8, down_mbps=8, latency_ms=5, loss=0.5, jitter_ms=1)

    def p0():
        for i in range(50):
            yield Send("party-1", Message("m", step=i, tensors={"x": torch.zeros(100)}))

    def p1():
        for _ in range(50):
            yield Recv()

    eng = _engine(endpoints={"party-0": (HOST, lossy), "party-1": (HOST, lossy)})
    eng.run({"party-0": p0(), "party-1": p1()})
    ser = _size("m", "party-0", "party-1", 100) * 8 / 8e6
    # with 50% loss about twice the serialization time is spent: far more than lossless
    assert eng.env.now > 50 * ser * 1.5
