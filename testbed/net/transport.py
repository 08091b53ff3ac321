"""The container engine's transport: authenticated, size-bounded frames over TCP.

One frame on the wire::

    u32 big-endian payload length | 12-byte nonce | 16-byte AES-GMAC tag | payload

(the frame format and its authentication are in :mod:`testbed.net.frames`).  A
:class:`Node` is one process's endpoint: a listening socket whose reader threads
verify and decode every incoming frame, and one :class:`Outbox` (a thread and an
outgoing connection) per peer, so sending never blocks the caller.

What a receiver rejects -- each with one log line naming the peer and the reason,
after which that connection is closed while the node keeps serving the others:

* a length over ``max_frame`` bytes (before reading the body: nothing is buffered),
* a frame cut short by the peer closing the connection (truncated),
* a MAC that does not match (wrong secret, tampered or corrupted bytes),
* a payload the codec cannot decode (malformed header, sizes that do not add up).

Links: bandwidth is shaped by ``tc`` inside each container (testbed/container/shaping.py);
the outbox adds the latency, jitter and loss that the kernel does not (no ``netem``):
a frame is released ``latency + |N(0, jitter)|`` after it was sent, plus, per lost
transmission, one serialization time and a retransmission timeout of twice the
path latency (the same model as :mod:`testbed.engine.links`); optional pacing stands in for
``tc`` where it is unavailable.  Each node measures what it saw: the RTT of a ``_ping``
per peer, and per sending peer the bytes and busy time (first to last byte of each
frame at the receiver) of the frames that arrived -- see :meth:`Node.link_report`.

Run the throughput benchmark:  python bench/transport.py
"""
import logging
import random
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from testbed.engine import codec
from testbed.errors import TransportError

from .frames import (CONTROL_PREFIX, DEFAULT_MAX_FRAME, FRAME_OVERHEAD, MEASURE_MIN_BYTES,  # noqa: F401
                     FrameRejected, frame_header, mac, read_frame, verify)

log = logging.getLogger(__name__)


@dataclass
class Emulation:
    """What the sender adds to a link: one-way latency and jitter (seconds), loss
    probability, and optional pacing (bits/s; 0 = leave bandwidth to ``tc``)."""

    latency_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    pace_bps: float = 0.0
    path_bps: float = 0.0   # the path's bandwidth, for the retransmission time of a loss

    def delay(self, nbytes, rng):
        """Seconds to hold a frame of ``nbytes`` before writing it to the socket."""
        d = self.latency_s + (abs(rng.gauss(0.0, self.jitter_s)) if self.jitter_s else 0.0)
        while self.loss > 0 and rng.random() < self.loss:
            d += (nbytes * 8 / self.path_bps if self.path_bps else 0.0) + 2 * self.latency_s
        return d


class Outbox:
    """One peer's outgoing connection: a FIFO delay line drained by its own thread."""

    def __init__(self, node, peer, address, emulation, rng):
        self.node, self.peer, self.address = node, peer, tuple(address)
        self.emulation, self.rng = emulation or Emulation(), rng
        self.queue, self.cond = deque(), threading.Condition()
        self.sock, self.closing, self.failed = None, False, None
        self.last_release, self.busy = 0.0, False
        self.bytes, self.frames = 0, 0
        self.thread = threading.Thread(target=self._run, name=f"outbox-{peer}", daemon=True)
        self.thread.start()

    def put(self, payload):
        """Queue one payload; its frame header (with the MAC) is computed here, by the caller."""
        head = frame_header(self.node.secret, payload)
        with self.cond:
            if self.failed:
                raise TransportError(f"{self.node.name}: link to {self.peer} is down ({self.failed})")
            now = time.perf_counter()
            # TCP keeps order: a frame never overtakes the one before it
            release = max(self.last_release, now + self.emulation.delay(len(payload), self.rng))
            self.last_release = release
            self.queue.append((release, head, payload))
            self.cond.notify()

    def _connect(self):
        deadline = time.monotonic() + self.node.connect_timeout
        while True:
            try:
                s = socket.create_connection(self.address, timeout=self.node.connect_timeout)
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return s
            except OSError as exc:
                if time.monotonic() > deadline or self.closing:
                    raise TransportError(f"cannot connect to {self.peer} at "
                                         f"{self.address[0]}:{self.address[1]}: {exc}") from None
                time.sleep(0.2)

    def _run(self):
        next_free = 0.0
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if not self.queue:
                    break
                release = max(self.queue[0][0], next_free)
                wait = release - time.perf_counter()
                if wait > 0 and not self.closing:
                    self.cond.wait(wait)
                    continue
                _, head, payload = self.queue.popleft()
                self.busy = True
            try:
                if self.sock is None:
                    self.sock = self._connect()
                t0 = time.perf_counter()
                self.sock.sendall(head)
                self.sock.sendall(payload)
                if self.emulation.pace_bps:
                    next_free = t0 + (len(head) + len(payload)) * 8 / self.emulation.pace_bps
                self.bytes += len(head) + len(payload)
                self.frames += 1
            except (OSError, TransportError) as exc:
                with self.cond:
                    self.failed = str(exc)
                    self.queue.clear()
                    self.busy = False
                    self.cond.notify_all()
                self.node._link_failed(self.peer, str(exc))
                break
            with self.cond:
                self.busy = False
                self.cond.notify_all()
        if self.sock is not None:
            self.sock.close()

    def close(self):
        with self.cond:
            self.closing = True
            self.cond.notify_all()


@dataclass
class Received:
    """Per sending peer: what arrived and how long its frames took (receiver's clock)."""

    bytes: int = 0
    frames: int = 0
    big_bytes: int = 0       # frames of at least MEASURE_MIN_BYTES ...
    big_seconds: float = 0.0  # ... and the time from their first to their last byte


class Node:
    """One process's endpoint.

    ``on_message(msg, address, nbytes)`` gets every authenticated, decoded message that
    is not the node's own ``_ping``/``_pong``; raising :class:`TransportError` from it
    rejects the frame (logged, connection closed).  ``on_disconnect(peer, reason)`` is
    called when a connection from a named peer ends or the link to it fails."""

    def __init__(self, name, secret, host="0.0.0.0", port=0, max_frame=DEFAULT_MAX_FRAME,
                 on_message=None, on_disconnect=None, connect_timeout=30.0, frame_timeout=600.0,
                 seed=0):
        if isinstance(secret, str):
            secret = secret.encode()
        if not secret:
            raise TransportError("empty run secret: set RUN_SECRET")
        self.name, self.secret, self.max_frame = name, secret, int(max_frame)
        self.on_message = on_message or (lambda msg, address, nbytes: None)
        self.on_disconnect = on_disconnect or (lambda peer, reason: None)
        self.connect_timeout, self.frame_timeout = connect_timeout, frame_timeout
        self.rng = random.Random(f"{seed}/{name}")
        self.peers, self.outboxes, self.received = {}, {}, {}
        self.rejected = []          # (peer, reason), newest last
        self.rtt = {}               # peer -> seconds
        self._pongs, self._lock, self._closing = {}, threading.Lock(), False
        self._server = socket.create_server((host, port), reuse_port=False)
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, name=f"{name}-accept", daemon=True).start()

    # -- peers and sending -----------------------------------------------------------------
    def add_peer(self, peer, address, emulation=None):
        """Where ``peer`` listens, and what the sender adds on the way there."""
        with self._lock:
            self.peers[peer] = (tuple(address), emulation or Emulation())

    def send(self, peer, payload):
        """Queue ``payload`` (codec bytes) for ``peer``; returns immediately."""
        with self._lock:
            box = self.outboxes.get(peer)
            if box is None:
                if peer not in self.peers:
                    raise TransportError(f"{self.name}: no address for {peer!r}; known: "
                                         f"{', '.join(sorted(self.peers)) or 'none'}")
                address, emu = self.peers[peer]
                box = self.outboxes[peer] = Outbox(self, peer, address, emu,
                                                   random.Random(self.rng.random()))
        box.put(payload)

    def send_message(self, peer, msg):
        msg.src = msg.src or self.name
        self.send(peer, codec.encode(msg))

    def flush(self, timeout=600.0):
        """Wait until every queued frame has been written to its socket."""
        deadline = time.monotonic() + timeout
        for box in list(self.outboxes.values()):
            with box.cond:
                while (box.queue or box.busy) and not box.failed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TransportError(f"{self.name}: frames to {box.peer} still queued "
                                             f"after {timeout:.0f}s")
                    box.cond.wait(min(left, 0.5))

    def ping(self, peer, timeout=30.0):
        """Round-trip time to ``peer`` of a small ``_ping`` frame (seconds)."""
        token = f"{self.name}/{peer}/{self.rng.getrandbits(64):x}"
        ev = threading.Event()
        self._pongs[token] = ev
        t0 = time.perf_counter()
        self.send_message(peer, codec.Message(kind="_ping", meta={"token": token}))
        if not ev.wait(timeout):
            raise TransportError(f"{self.name}: no answer to a ping from {peer} within {timeout:.0f}s")
        self.rtt[peer] = ev.arrived - t0
        return self.rtt[peer]

    def probe(self, peer, nbytes, timeout=300.0):
        """Send ``nbytes`` to ``peer`` in one frame; returns (frame bytes, seconds from its
        first to its last byte at the peer)."""
        token = f"{self.name}/{peer}/{self.rng.getrandbits(64):x}"
        ev = threading.Event()
        self._pongs[token] = ev
        self.send_message(peer, codec.Message(kind="_probe", meta={"token": token},
                                              tensors={"x": torch.zeros(int(nbytes), dtype=torch.uint8)}))
        if not ev.wait(timeout):
            raise TransportError(f"{self.name}: no answer to a probe from {peer} within {timeout:.0f}s")
        return ev.reply["bytes"], ev.reply["seconds"]

    def set_emulation(self, peer, emulation):
        """Change what the sender adds on the way to ``peer`` (frames already queued keep theirs)."""
        with self._lock:
            address, _ = self.peers[peer]
            self.peers[peer] = (address, emulation)
            if peer in self.outboxes:
                self.outboxes[peer].emulation = emulation

    def link_report(self, reset=False):
        """Per peer what was measured: sent bytes and frames, RTT, and what arrived from it
        (bytes, frames, achieved Mbit/s over frames of at least MEASURE_MIN_BYTES).
        ``reset``: start counting afresh (per protocol)."""
        out = {}
        for peer in sorted(set(self.outboxes) | set(self.received) | set(self.rtt)):
            box, got = self.outboxes.get(peer), self.received.get(peer, Received())
            out[peer] = {
                "sent_bytes": box.bytes if box else 0, "sent_frames": box.frames if box else 0,
                "rtt_ms": self.rtt[peer] * 1e3 if peer in self.rtt else None,
                "recv_bytes": got.bytes, "recv_frames": got.frames,
                "recv_mbps": got.big_bytes * 8 / got.big_seconds / 1e6 if got.big_seconds else None}
            if reset:
                self.received[peer] = Received()
                if box:
                    box.bytes = box.frames = 0
        return out

    def close(self):
        self._closing = True
        for box in list(self.outboxes.values()):
            box.close()
        try:
            self._server.close()
        except OSError:
            pass

    # -- receiving -------------------------------------------------------------------------
    def _accept(self):
        while not self._closing:
            try:
                conn, address = self._server.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn, address), daemon=True,
                             name=f"{self.name}-reader").start()

    def _reject(self, peer, address, reason):
        who = f"{peer or 'unauthenticated peer'} at {address[0]}:{address[1]}"
        log.warning("%s: rejected a frame from %s: %s; connection closed", self.name, who, reason)
        self.rejected.append((peer or f"{address[0]}:{address[1]}", reason))

    def _serve(self, conn, address):
        peer, reason = None, "connection closed"
        try:
            while True:
                conn.settimeout(None)
                got = read_frame(_Deadline(conn, self.frame_timeout), self.secret, self.max_frame)
                if got is None:
                    break
                payload, t_first, t_last = got
                msg = codec.decode(payload)
                # the peer is a process: named by its control frames (a protocol frame names a
                # role, which may live in another process's container, e.g. ``cloud``)
                if peer is None or msg.kind.startswith(CONTROL_PREFIX):
                    peer = msg.src or peer
                self._account(peer, len(payload) + FRAME_OVERHEAD, t_first, t_last)
                if msg.kind == "_ping":
                    self.send_message(msg.src, codec.Message(kind="_pong", meta=msg.meta))
                elif msg.kind == "_probe":
                    self.send_message(msg.src, codec.Message(kind="_pong", meta={
                        "token": msg.meta.get("token"), "bytes": len(payload) + FRAME_OVERHEAD,
                        "seconds": t_last - t_first}))
                elif msg.kind == "_pong":
                    ev = self._pongs.pop(msg.meta.get("token"), None)
                    if ev is not None:
                        ev.arrived, ev.reply = t_last, msg.meta
                        ev.set()
                else:
                    self.on_message(msg, address, len(payload))
        except TransportError as exc:
            reason = str(exc)
            self._reject(peer, address, reason)
        except OSError as exc:
            reason = f"connection error: {exc}"
            if not self._closing:
                self._reject(peer, address, reason)
        except Exception as exc:  # a handler's error must not kill the reader silently
            reason = f"{type(exc).__name__}: {exc}"
            self._reject(peer, address, reason)
        finally:
            conn.close()
        if peer is not None and not self._closing:
            self.on_disconnect(peer, reason)

    def _account(self, peer, nbytes, t_first, t_last):
        got = self.received.setdefault(peer, Received())
        got.bytes += nbytes
        got.frames += 1
        if nbytes >= MEASURE_MIN_BYTES and t_last > t_first:
            got.big_bytes += nbytes
            got.big_seconds += t_last - t_first

    def _link_failed(self, peer, reason):
        if not self._closing:
            log.warning("%s: link to %s failed: %s", self.name, peer, reason)
            self.on_disconnect(peer, reason)


class _Deadline:
    """A socket whose reads, once a frame has started, must finish within ``timeout``
    seconds (a peer that stalls mid-frame is cut off instead of holding a reader forever)."""

    def __init__(self, sock, timeout):
        self.sock, self.timeout, self.reads = sock, timeout, 0

    def recv_into(self, view):
        self.reads += 1
        if self.reads == 2:   # the frame has started: from now on, reads have a deadline
            self.sock.settimeout(self.timeout)
        try:
            return self.sock.recv_into(view)
        except socket.timeout:
            raise FrameRejected(f"stalled frame: nothing arrived for {self.timeout:.0f}s") from None
