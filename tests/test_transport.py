"""The container transport over real TCP on loopback: frames, rejections, emulation.

No Docker needed.  The rejection tests write hostile bytes to a live node -- in this
process, and in a live coordinator process of a real run -- and check that each one is
refused with a logged reason while a good frame afterwards still gets through.
"""
import hashlib
import hmac
import logging
import queue
import random
import socket
import struct
import types

import pytest
import torch
import yaml
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from testbed.engine import codec
from testbed.errors import TransportError
from testbed.net.transport import FRAME_OVERHEAD, Emulation, Node, frame_header, verify

from conftest import tiny_scenario

SECRET = b"test-secret"


@pytest.fixture
def pair():
    """Nodes ``a`` and ``b`` that know each other; ``b`` puts what it receives in a queue."""
    got = queue.Queue()
    b = Node("b", SECRET, host="127.0.0.1", on_message=lambda msg, addr, n: got.put((msg, n)))
    a = Node("a", SECRET, host="127.0.0.1", on_message=lambda msg, addr, n: None)
    a.add_peer("b", ("127.0.0.1", b.port))
    b.add_peer("a", ("127.0.0.1", a.port))
    yield a, b, got
    a.close()
    b.close()


def _msg(n=5):
    return codec.Message(kind="act", step=3, meta={"layer": 1},
                         tensors={"x": torch.arange(n, dtype=torch.float32)})


def _raw(node, data, half_close=False):
    """Write ``data`` to ``node`` on a fresh connection; return once the node closed it."""
    s = socket.create_connection(("127.0.0.1", node.port))
    s.sendall(data)
    if half_close:
        s.shutdown(socket.SHUT_WR)
    try:
        assert s.recv(1) == b""           # the node closes the connection...
    except ConnectionResetError:          # ...or resets it, when it left bytes unread
        pass
    s.close()


def test_good_frame_arrives_with_its_tensors(pair):
    a, b, got = pair
    a.send_message("b", _msg())
    msg, nbytes = got.get(timeout=30)
    assert (msg.kind, msg.src, msg.step, msg.meta) == ("act", "a", 3, {"layer": 1})
    assert torch.equal(msg.tensors["x"], torch.arange(5, dtype=torch.float32))
    assert nbytes == len(codec.encode(codec.Message(kind="act", src="a", step=3, meta={"layer": 1},
                                                    tensors={"x": torch.arange(5, dtype=torch.float32)})))


def test_frame_layout_is_length_nonce_tag_payload():
    payload = b"hello"
    head = frame_header(SECRET, payload)
    assert len(head) == FRAME_OVERHEAD == 32
    assert head[:4] == struct.pack(">I", 5)
    nonce = head[4:16]
    key = hmac.new(SECRET, b"testbed frame mac", hashlib.sha256).digest()
    assert head[16:] == AESGCM(key).encrypt(nonce, b"", payload)   # the GMAC tag
    assert verify(SECRET, head[4:], payload)
    assert not verify(SECRET, head[4:], b"hellO") and not verify(b"other", head[4:], payload)
    assert frame_header(SECRET, payload)[4:16] != nonce             # a fresh nonce per frame


def _bad_mac():
    payload = codec.encode(_msg())
    return struct.pack(">I", len(payload)) + b"\0" * 28 + payload, False


def _truncated():
    payload = codec.encode(_msg())
    return (frame_header(SECRET, payload) + payload)[:-7], True


def _oversized():
    return struct.pack(">I", (1 << 31)) + b"x" * 100, False


def _malformed():
    payload = struct.pack(">I", 4) + b"{no}"
    return frame_header(SECRET, payload) + payload, False


@pytest.mark.parametrize("make, reason", [
    (_bad_mac, "bad MAC"), (_truncated, "truncated frame"),
    (_oversized, "exceeds the limit of"), (_malformed, "malformed message header")])
def test_bad_frames_are_rejected_and_logged_and_the_node_keeps_serving(pair, caplog, make, reason):
    a, b, got = pair
    data, half_close = make()
    with caplog.at_level(logging.WARNING, logger="testbed.net.transport"):
        _raw(b, data, half_close)
        a.send_message("b", _msg())
        msg, _ = got.get(timeout=30)
    assert msg.kind == "act" and got.empty()
    assert [r for _, r in b.rejected if reason in r], b.rejected
    lines = [r.getMessage() for r in caplog.records if "rejected a frame" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0] and "127.0.0.1:" in lines[0], lines


def test_oversized_frame_is_refused_before_its_body_is_read():
    b = Node("b", SECRET, host="127.0.0.1", max_frame=1000)
    try:
        payload = codec.encode(_msg(300))        # > 1000 bytes
        _raw(b, frame_header(SECRET, payload) + payload)
        assert b.rejected and f"frame of {len(payload)} bytes exceeds the limit of 1000" in b.rejected[0][1]
    finally:
        b.close()


def test_handler_errors_reject_the_frame_not_the_node(pair):
    a, _, _ = pair
    seen = queue.Queue()

    def strict(msg, addr, n):
        if msg.kind != "ok":
            raise TransportError(f"nobody here hosts {msg.dst!r}")
        seen.put(msg)
    c = Node("c", SECRET, host="127.0.0.1", on_message=strict)
    try:
        a.add_peer("c", ("127.0.0.1", c.port))
        a.send_message("c", codec.Message(kind="bad", dst="nobody"))
        a2 = Node("a2", SECRET, host="127.0.0.1")
        a2.add_peer("c", ("127.0.0.1", c.port))
        a2.send_message("c", codec.Message(kind="ok"))
        assert seen.get(timeout=30).src == "a2"
        a2.close()
        assert any("nobody here hosts 'nobody'" in r for _, r in c.rejected)
    finally:
        c.close()


def test_wrong_secret_is_rejected(pair):
    _, b, got = pair
    liar = Node("liar", b"other-secret", host="127.0.0.1")
    try:
        liar.add_peer("b", ("127.0.0.1", b.port))
        liar.send_message("b", _msg())
        liar.flush()
        ok = Node("ok", SECRET, host="127.0.0.1")
        ok.add_peer("b", ("127.0.0.1", b.port))
        ok.send_message("b", _msg())
        assert got.get(timeout=30)[0].src == "ok"
        ok.close()
        assert got.empty()
    finally:
        liar.close()


def test_frames_keep_their_order_under_jitter(pair):
    a, _, got = pair
    a.add_peer("b", a.peers["b"][0], Emulation(latency_s=0.001, jitter_s=0.02))
    for i in range(30):
        a.send_message("b", codec.Message(kind="seq", step=i))
    assert [got.get(timeout=30)[0].step for _ in range(30)] == list(range(30))


def test_emulated_delay_follows_the_link_model():
    emu = Emulation(latency_s=0.05, jitter_s=0.002, loss=0.3, path_bps=8e6)
    rng, ref = random.Random(7), random.Random(7)
    for nbytes in (100, 10_000, 1_000_000):
        expected = 0.05 + abs(ref.gauss(0.0, 0.002))
        while ref.random() < 0.3:   # each loss: one more serialization and an RTO of 2x latency
            expected += nbytes * 8 / 8e6 + 2 * 0.05
        assert emu.delay(nbytes, rng) == pytest.approx(expected, abs=1e-12)
    assert Emulation().delay(123, rng) == 0.0


def test_ping_round_trip_carries_both_emulated_latencies(pair):
    a, b, _ = pair
    a.set_emulation("b", Emulation(latency_s=0.02))
    b.set_emulation("a", Emulation(latency_s=0.03))
    assert a.ping("b") >= 0.05        # a delay line can hold a frame back, never speed it up
    assert a.link_report()["b"]["rtt_ms"] >= 50


def test_probe_reports_the_frame_the_peer_received(pair):
    a, b, _ = pair
    nbytes, seconds = a.probe("b", 300_000)
    # the probe tensor, plus the frame and a codec header of a few dozen bytes
    assert 300_000 + FRAME_OVERHEAD < nbytes < 300_000 + FRAME_OVERHEAD + 300 and seconds >= 0
    report = b.link_report()["a"]
    assert report["recv_frames"] == 1 and report["recv_bytes"] == nbytes
    assert report["recv_mbps"] is not None


def test_send_to_an_unknown_peer_names_the_known_ones(pair):
    a, _, _ = pair
    with pytest.raises(TransportError, match="no address for 'zed'; known: b"):
        a.send("zed", b"x")


def test_live_coordinator_rejects_bad_frames_and_the_run_goes_on(tmp_path):
    """A real coordinator process: hostile frames before the party registers, then a full run."""
    from testbed.container.loopback import Loopback
    from testbed.container.prepare import prepare

    sc = tiny_scenario(baselines=[], parties={"count": 1}, training={"steps": 2, "eval_every": 2})
    scenario_file = tmp_path / "scenario.yaml"
    scenario_file.write_text(yaml.safe_dump(sc.resolved()))
    prepare(sc, tmp_path / "data")
    lb = Loopback(sc, scenario_file, tmp_path / "data", tmp_path / "runs", "live")
    try:
        port = lb.start_coordinator()
        node = types.SimpleNamespace(port=port)
        for make in (_bad_mac, _truncated, _oversized):
            data, half_close = make()
            _raw(node, data, half_close)
        lb.start_parties()
        codes = lb.wait()
    finally:
        lb.kill()
    out = lb.text("coordinator")
    assert codes == {"coordinator": 0, "party-0": 0}, out + lb.text("party-0")
    rejections = [line for line in out.splitlines()
                  if "rejected a frame from unauthenticated peer at 127.0.0.1" in line]
    assert len(rejections) == 3, out
    for reason, line in zip(("bad MAC", "truncated frame", "exceeds the limit"), rejections):
        assert reason in line
    assert (lb.run_dir / "summary.json").exists()
