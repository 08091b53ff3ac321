"""One peer's outgoing side of the transport: link emulation and the delay line.

An :class:`Outbox` is a thread and one mutual-TLS connection to one peer.  The caller
queues a payload and returns at once; the thread writes it when its release time has
come.  The release time adds what the kernel does not (no ``netem``): a frame leaves
``latency + |N(0, jitter)|`` after it was queued, plus, per lost transmission, one
serialization time and a retransmission timeout of twice the path latency (the same
model as :mod:`testbed.engine.links`); optional pacing stands in for ``tc`` where it is
unavailable.  Frames never overtake each other (TCP keeps order).

The connection is opened on the first frame: TCP, then the TLS handshake, in which the
peer must show a certificate of the run's CA naming ``peer`` (:mod:`.identity`).  A
certificate that fails verification is fatal at once; a refused or reset connection
(a peer still starting, or busy) is retried until ``connect_timeout``.
"""
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass

from testbed.errors import TransportError

from .frames import frame_header


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
        """Queue one payload (bytes-like; not copied)."""
        with self.cond:
            if self.failed:
                raise TransportError(f"{self.node.name}: link to {self.peer} is down ({self.failed})")
            now = time.perf_counter()
            release = max(self.last_release, now + self.emulation.delay(len(payload), self.rng))
            self.last_release = release
            self.queue.append((release, payload))
            self.cond.notify()

    def _connect(self):
        deadline = time.monotonic() + self.node.connect_timeout
        where = f"{self.peer} at {self.address[0]}:{self.address[1]}"
        while True:
            try:
                s = socket.create_connection(self.address, timeout=self.node.connect_timeout)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(self.node.handshake_timeout)
                try:
                    tls = self.node.client_context.wrap_socket(s, server_hostname=self.peer)
                except BaseException:
                    s.close()
                    raise
                tls.settimeout(None)
                return tls
            except ssl.SSLCertVerificationError as exc:
                raise TransportError(f"cannot authenticate {where}: {exc.verify_message or exc}") from None
            except OSError as exc:   # refused, reset, or a peer that closed a busy slot: retry
                if time.monotonic() > deadline or self.closing:
                    raise TransportError(f"cannot connect to {where}: {exc}") from None
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
                _, payload = self.queue.popleft()
                self.busy = True
            try:
                if self.sock is None:
                    self.sock = self._connect()
                t0 = time.perf_counter()
                head = frame_header(payload)
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
            try:
                self.sock.close()
            except OSError:
                pass

    def close(self):
        with self.cond:
            self.closing = True
            self.cond.notify_all()
