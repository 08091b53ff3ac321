"""The container engine: this process's roles, real time, real network.

The same effects as the embedded engine (:mod:`testbed.engine.sim`), with the same
meaning, interpreted for real:

* ``Send(dst, msg)``: the message is encoded with the wire codec (its byte count is
  the one the embedded engine reports), captured by the sender, and handed to the
  transport (:class:`testbed.net.transport.Node`), which returns at once; a destination
  role hosted by this same process gets a decoded copy in its mailbox instead.
* ``Recv(src, kind)``: blocks the role until a message matching ``src``/``kind``
  arrives; messages that do not match wait in arrival order (as the embedded engine's
  ``FilterStore``).  No match within ``recv_timeout`` seconds is an error naming the
  role and what it waited for.
* ``Compute(...)``: nothing to model -- the device is real; the modelled seconds are
  only added to ``compute_time`` (the role's measured compute is counted as well).
* ``Log(record)``: stamped with protocol, role, ``sim_time`` and ``wall_time`` --
  both the *wall* seconds since the protocol started on the coordinator's clock (there
  is no simulated clock in container mode) -- and ``bytes``: what this process's roles
  have sent so far.

One thread drives every local role, each up to its next blocking ``Recv`` in turn, so
a process hosting several roles (``server`` and ``fedserver`` of SplitFed) needs no
locks.  The transport's reader threads fill the :class:`Mailbox`.
"""
import threading
import time
from collections import defaultdict

from testbed.engine import codec
from testbed.engine.effects import Compute, Log, Recv, Send
from testbed.errors import ProtocolError, TransportError


class Mailbox:
    """Messages for this process's roles, in arrival order, plus a failure slot that
    wakes the engine (a peer's error, a lost connection, the coordinator's abort)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.boxes = defaultdict(list)
        self.bytes_in = defaultdict(int)
        self.version = 0
        self.failure = None

    def put(self, msg, nbytes):
        with self.cond:
            self.boxes[msg.dst].append(msg)
            self.bytes_in[msg.dst] += nbytes
            self.version += 1
            self.cond.notify_all()

    def take(self, role, recv):
        """The first message for ``role`` matching ``recv``, or None."""
        with self.cond:
            box = self.boxes[role]
            for i, m in enumerate(box):
                if (recv.src is None or m.src == recv.src) and (recv.kind is None or m.kind == recv.kind):
                    return box.pop(i)
        return None

    def fail(self, exc):
        with self.cond:
            if self.failure is None:
                self.failure = exc
            self.cond.notify_all()

    def wait(self, seen, timeout):
        """Block until something arrived after version ``seen`` (or ``timeout`` s)."""
        with self.cond:
            if self.version == seen and self.failure is None:
                self.cond.wait(timeout)
            if self.failure is not None:
                raise self.failure
            return self.version

    def reset(self):
        """End of a protocol: drop what nobody received; return and zero the byte counts."""
        with self.cond:
            leftover = {r: len(b) for r, b in self.boxes.items() if b}
            counts = dict(self.bytes_in)
            self.boxes.clear()
            self.bytes_in.clear()
            return counts, leftover


class ContainerEngine:
    def __init__(self, protocol, process, locate, node, mailbox, on_log=None, capture=None,
                 t0=None, recv_timeout=600.0):
        """``locate``: role name -> name of the process hosting it; ``node``: this
        process's :class:`~testbed.net.transport.Node` (None when every role is local);
        ``t0``: the protocol's start, ``time.time()`` on the coordinator."""
        self.protocol, self.process, self.locate = protocol, process, dict(locate)
        self.node, self.mailbox = node, mailbox
        self.on_log = on_log or (lambda rec: None)
        self.capture = capture
        self.t0 = time.time() if t0 is None else t0
        self.recv_timeout = recv_timeout
        self.bytes_sent = 0
        self.messages = 0
        self.bytes_up = defaultdict(int)
        self.compute_time = defaultdict(float)
        self.modelled_time = defaultdict(float)

    def now(self):
        return time.time() - self.t0

    # -- effects -------------------------------------------------------------------------
    def _send(self, role, eff):
        msg = eff.message
        if eff.dst not in self.locate:
            raise ProtocolError(f"{role}: send of {msg.kind!r} to unknown role {eff.dst!r}; "
                                f"roles: {', '.join(self.locate)}")
        if msg.kind.startswith("_"):
            raise ProtocolError(f"{role}: message kind {msg.kind!r} is reserved for the engine "
                                "(kinds starting with '_')")
        msg.src, msg.dst = role, eff.dst
        data = codec.encode(msg)
        self.bytes_sent += len(data)
        self.messages += 1
        self.bytes_up[role] += len(data)
        if self.capture is not None:
            self.capture.record(codec.decode(data), len(data), codec.header_size(data), self.now())
        where = self.locate[eff.dst]
        if where == self.process:
            self.mailbox.put(codec.decode(data), len(data))
        elif self.node is None:
            raise TransportError(f"{role}: {eff.dst} is hosted by {where}, and this process has no network")
        else:
            self.node.send(where, data)

    def _log(self, role, eff):
        rec = dict(eff.record)
        rec.setdefault("role", role)
        t = self.now()
        rec.update(protocol=self.protocol, sim_time=t, wall_time=t, bytes=self.bytes_sent)
        self.on_log(rec)

    def _advance(self, role, gen, value):
        """Run ``role`` until it blocks on a Recv nobody has answered yet, or ends.
        Returns the pending Recv, or None when the role finished."""
        while True:
            t = time.perf_counter()
            try:
                eff = gen.send(value)
            except StopIteration:
                return None
            except BaseException as exc:
                if not hasattr(exc, "role"):
                    try:
                        exc.role = role   # the process reports which of its roles failed
                    except AttributeError:
                        pass
                raise
            finally:
                self.compute_time[role] += time.perf_counter() - t
            value = None
            if isinstance(eff, Send):
                self._send(role, eff)
            elif isinstance(eff, Recv):
                value = self.mailbox.take(role, eff)
                if value is None:
                    return eff
            elif isinstance(eff, Compute):
                self.modelled_time[role] += eff.seconds
            elif isinstance(eff, Log):
                self._log(role, eff)
            else:
                raise ProtocolError(f"{role}: yielded {type(eff).__name__}, expected Send, Recv, "
                                    "Compute or Log")

    def run(self, roles):
        """Run this process's ``roles`` (name -> generator) to completion; return statistics."""
        elsewhere = [r for r in roles if self.locate.get(r) != self.process]
        if elsewhere:
            raise ProtocolError(f"{self.process}: roles {', '.join(elsewhere)} are not hosted here")
        gens = dict(roles)
        waiting = {}            # role -> (Recv, since)
        seen = self.mailbox.version
        for role, gen in list(gens.items()):
            self._resume(role, gen, None, gens, waiting)
        while gens:
            if self.mailbox.failure is not None:
                raise self.mailbox.failure
            progressed = False
            for role in list(waiting):
                recv, since = waiting[role]
                msg = self.mailbox.take(role, recv)
                if msg is not None:
                    del waiting[role]
                    self._resume(role, gens[role], msg, gens, waiting)
                    progressed = True
                elif time.monotonic() - since > self.recv_timeout:
                    raise ProtocolError(
                        f"{role}: no message within {self.recv_timeout:g}s while waiting for "
                        f"{_describe(recv)} (protocol {self.protocol}, process {self.process})")
            if not progressed and gens:
                seen = self.mailbox.wait(seen, timeout=1.0)
        if self.node is not None:
            self.node.flush()
        return self.stats()

    def _resume(self, role, gen, value, gens, waiting):
        recv = self._advance(role, gen, value)
        if recv is None:
            del gens[role]
        else:
            waiting[role] = (recv, time.monotonic())

    def stats(self):
        return {"sim_time": self.now(), "bytes": self.bytes_sent, "messages": self.messages,
                "bytes_up": dict(self.bytes_up), "compute_time": dict(self.compute_time),
                "modelled_compute_time": dict(self.modelled_time)}


def _describe(recv):
    parts = [f"src={recv.src!r}" if recv.src else "any src",
             f"kind={recv.kind!r}" if recv.kind else "any kind"]
    return "a message (" + ", ".join(parts) + ")"
