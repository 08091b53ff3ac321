"""The container engine's transport: size-bounded frames over mutual TLS.

A :class:`Node` is one process's endpoint: a listening socket whose reader threads
authenticate every connection (TLS 1.3, a certificate of the run's CA on both ends,
:mod:`testbed.net.identity`), then read, decode and check its frames; and one
:class:`~testbed.net.outbox.Outbox` (a thread and an outgoing connection) per peer, so
sending never blocks the caller.  Frames are ``u32 length | codec payload``
(:mod:`testbed.net.frames`); tensors go from the codec's buffer to the socket and back
into one buffer per frame, never pickled.

The identity of a connection is the common name of the certificate its peer showed.
Nothing sized by the peer is allocated before that: an unauthenticated connection costs
a thread and TLS state only, for at most ``handshake_timeout`` seconds, and at most
``max_pending`` of them exist at a time (more are closed at once).  An authenticated
peer may hold ``max_per_peer`` connections.  What a receiver refuses -- each with one
log line naming the peer and the reason:

* closes the connection: a failed or late TLS handshake (wrong CA, plain TCP, a
  recorded connection replayed), the caps above, a length over ``max_frame`` (before
  the body is read), a frame cut short, a frame stalled for ``frame_timeout`` seconds;
* drops the frame, keeps the connection (the stream is still in step): a payload the
  codec cannot decode, a message whose ``src`` is not hosted by the connection's
  identity (``owner(src) != identity``; a control message's ``src`` must be the
  identity itself), a frame the handler refuses (:class:`TransportError`).

Replays and reordering inside a connection are refused by TLS itself (record sequence
numbers under AEAD); ``on_disconnect`` fires only when a peer's *last* connection ends,
so a stray connection that closes never looks like a dead process.

Each node measures what it saw: the RTT of a ``_ping`` per peer, and per sending peer
the bytes and busy time (first to last byte of each frame at the receiver) of the frames
that arrived -- see :meth:`Node.link_report`.

Run the throughput benchmark:  python bench/transport.py
"""
import logging
import random
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch

from testbed.engine import codec
from testbed.errors import TransportError

from .frames import (CONTROL_PREFIX, DEFAULT_MAX_FRAME, FRAME_OVERHEAD, MEASURE_MIN_BYTES,  # noqa: F401
                     FrameRejected, read_frame)
from .identity import peer_name
from .outbox import Emulation, Outbox  # noqa: F401 -- Emulation is part of this module's API

log = logging.getLogger(__name__)


@dataclass
class Received:
    """Per sending peer: what arrived and how long its frames took (receiver's clock)."""

    bytes: int = 0
    frames: int = 0
    big_bytes: int = 0       # frames of at least MEASURE_MIN_BYTES ...
    big_seconds: float = 0.0  # ... and the time from their first to their last byte


class Node:
    """One process's endpoint, named by its :class:`~testbed.net.identity.Identity`.

    ``on_message(msg, address, nbytes)`` gets every authenticated, decoded message that
    is not the node's own ``_ping``/``_pong``; raising :class:`TransportError` from it
    rejects the frame (logged).  ``on_disconnect(peer, reason)`` is called when the last
    connection from a peer ends or the link to it fails.  ``owner(role)``: the process
    (identity) allowed to send as ``role`` (default: the role itself)."""

    def __init__(self, identity, host="0.0.0.0", port=0, max_frame=DEFAULT_MAX_FRAME,
                 on_message=None, on_disconnect=None, owner=None, connect_timeout=30.0,
                 frame_timeout=600.0, handshake_timeout=10.0, max_pending=32, max_per_peer=4, seed=0):
        self.name, self.identity, self.max_frame = identity.name, identity, int(max_frame)
        self.server_context, self.client_context = identity.server_context(), identity.client_context()
        self.on_message = on_message or (lambda msg, address, nbytes: None)
        self.on_disconnect = on_disconnect or (lambda peer, reason: None)
        self.owner = owner or (lambda role: role)
        self.connect_timeout, self.frame_timeout = connect_timeout, frame_timeout
        self.handshake_timeout, self.max_pending, self.max_per_peer = handshake_timeout, max_pending, max_per_peer
        self.rng = random.Random(f"{seed}/{self.name}")
        self.peers, self.outboxes, self.received = {}, {}, {}
        self.rejected = []          # (peer, reason), newest last
        self.rtt = {}               # peer -> seconds
        self.pending, self.connections = 0, Counter()   # handshakes under way; open per identity
        self.pending_peak = 0
        self._pongs, self._lock, self._closing = {}, threading.Lock(), False
        self._server = socket.create_server((host, port), reuse_port=False)
        self._server.listen(128)
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, name=f"{self.name}-accept", daemon=True).start()

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
            with self._lock:
                full = self.pending >= self.max_pending
                if not full:
                    self.pending += 1
                    self.pending_peak = max(self.pending_peak, self.pending)
            if full:
                self._reject(None, address, f"{self.max_pending} connections are already authenticating "
                                            "(max_pending)")
                conn.close()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn, address), daemon=True,
                             name=f"{self.name}-reader").start()

    def _reject(self, peer, address, reason, closed=True):
        who = f"{peer or 'unauthenticated peer'} at {address[0]}:{address[1]}"
        log.warning("%s: rejected %s from %s: %s%s", self.name, "a connection" if peer is None else "a frame",
                    who, reason, "; connection closed" if closed else "")
        self.rejected.append((peer or f"{address[0]}:{address[1]}", reason))

    def _handshake(self, conn, address):
        """The TLS handshake, within ``handshake_timeout``; returns (socket, identity) or None.
        The connection holds one of the ``max_pending`` places until this returns."""
        reason = None
        try:
            conn.settimeout(self.handshake_timeout)
            tls = self.server_context.wrap_socket(conn, server_side=True)
            return tls, peer_name(tls)
        except socket.timeout:
            reason = f"no TLS handshake within {self.handshake_timeout:g}s"
        except (ssl.SSLError, OSError, TransportError) as exc:
            reason = f"TLS handshake failed: {exc}"
        finally:
            if reason is not None:
                conn.close()
                if not self._closing:
                    self._reject(None, address, reason)
            with self._lock:
                self.pending -= 1
        return None

    def _serve(self, conn, address):
        got = self._handshake(conn, address)
        if got is None:
            return
        tls, peer = got
        with self._lock:
            over = self.connections[peer] >= self.max_per_peer
            if not over:
                self.connections[peer] += 1
        if over:
            self._reject(peer, address, f"{peer} holds {self.max_per_peer} connections already (max_per_peer)")
            tls.close()
            return
        reason = "connection closed"
        try:
            reason = self._read_frames(tls, address, peer)
        finally:
            try:
                tls.close()
            except OSError:
                pass
            with self._lock:
                self.connections[peer] -= 1
                last = self.connections[peer] == 0
        if last and not self._closing:
            self.on_disconnect(peer, reason)

    def _read_frames(self, tls, address, peer):
        """Serve one authenticated connection until it ends; returns why it ended."""
        try:
            while True:
                tls.settimeout(None)   # between frames a peer may be silent (it is computing)
                got = read_frame(_Deadline(tls, self.frame_timeout), self.max_frame)
                if got is None:
                    return "connection closed"
                payload, t_first, t_last = got
                try:
                    msg = codec.decode(payload)
                    self._check_src(msg, peer)
                    self._account(peer, len(payload) + FRAME_OVERHEAD, t_first, t_last)
                    self._dispatch(msg, payload, t_first, t_last, address)
                except TransportError as exc:   # the stream is still in step: drop this frame only
                    self._reject(peer, address, str(exc), closed=False)
                except Exception as exc:  # a handler's bug must not kill the reader silently
                    self._reject(peer, address, f"{type(exc).__name__}: {exc}", closed=False)
        except TransportError as exc:
            reason = str(exc)
        except OSError as exc:
            reason = f"connection error: {exc}"
            if self._closing:
                return reason
        self._reject(peer, address, reason)
        return reason

    def _check_src(self, msg, peer):
        if msg.kind.startswith(CONTROL_PREFIX):
            ok = msg.src == peer
        else:
            ok = bool(msg.src) and self.owner(msg.src) == peer
        if not ok:
            raise FrameRejected(f"message {msg.kind!r} claims src {msg.src!r}, which the connection's "
                                f"authenticated identity {peer!r} may not send as")

    def _dispatch(self, msg, payload, t_first, t_last, address):
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
            raise FrameRejected(f"stalled frame: nothing arrived for {self.timeout:g}s") from None
