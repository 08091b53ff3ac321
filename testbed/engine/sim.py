"""The embedded engine: every role in one process, on a SimPy clock.

Each protocol role (a generator of :mod:`testbed.engine.effects`) becomes a SimPy process.
The engine

* times the real work a role does between two yields and turns it into simulated
  compute time on the role's device profile (``compute.mode``: ``flops``, the default,
  counts FLOPs with :class:`~testbed.engine.flops.FlopCount` -- deterministic, so the
  time axis does not depend on what else the machine was doing --, ``measured`` scales
  wall time, ``none`` ignores it);
* passes every sent message through the wire codec (encode -> bytes -> decode), so
  byte counts are real and the receiver gets its own copy, then through capture, then
  over the sender's uplink and the receiver's downlink (:mod:`testbed.engine.links`);
* stamps every ``Log`` record with protocol, simulated time, wall time and the bytes
  sent so far, and hands it to ``on_log``.

A run whose roles wait forever raises :class:`ProtocolError` naming who waits for what.
"""
import time

import simpy

from . import codec
from .devices import modelled_seconds, scale_measured
from .flops import FlopCount
from .effects import Compute, Log, Recv, Send
from testbed.errors import ProtocolError
from .links import SimLink, transfer


class SimEngine:
    def __init__(self, protocol, endpoints, rng, on_log=None, capture=None, compute_mode="flops"):
        """``endpoints``: role name -> (DeviceProfile, LinkCfg)."""
        self.protocol = protocol
        self.env = simpy.Environment()
        self.rng = rng
        self.on_log = on_log or (lambda rec: None)
        self.capture = capture
        self.compute_mode = compute_mode
        self.devices = {name: dev for name, (dev, _) in endpoints.items()}
        self.links = {name: SimLink(self.env, name, link) for name, (_, link) in endpoints.items()}
        self.mailbox = {name: simpy.FilterStore(self.env) for name in endpoints}
        self.waiting = {}
        self.trace = []          # (arrival sim time, src, dst, bytes, kind)
        self.bytes_sent = 0
        self.messages = 0
        self.compute_time = {name: 0.0 for name in endpoints}
        self._t0 = time.perf_counter()
        self._failure = None
        self._abort = self.env.event()

    # -- effects -------------------------------------------------------------------------
    def _advance(self, role, gen, value):
        """Run the role up to its next yield; return (effect, simulated compute seconds)."""
        t0 = time.perf_counter()
        if self.compute_mode == "flops":
            with FlopCount() as fc:
                eff = gen.send(value)
            dt = modelled_seconds(fc.get_total_flops(), 0, self.devices[role])
        else:
            eff = gen.send(value)
            dt = scale_measured(time.perf_counter() - t0, self.devices[role]) \
                if self.compute_mode == "measured" else 0.0
        return eff, dt

    def _send(self, role, eff):
        if eff.dst not in self.mailbox:
            raise ProtocolError(f"{role}: send of {eff.message.kind!r} to unknown role {eff.dst!r}; "
                                f"roles: {', '.join(self.mailbox)}")
        msg = eff.message
        msg.src, msg.dst = role, eff.dst
        # each tensor copied once into the frame; the receiver and the capture share the
        # decoded copy (the capture writes exactly the bytes that crossed the wire)
        data = codec.encode_buffer(msg)
        delivered = codec.decode(data)
        self.bytes_sent += len(data)
        self.messages += 1
        if self.capture is not None:
            self.capture.record(delivered, len(data), codec.header_size(data), self.env.now)
        self.env.process(self._deliver(role, eff.dst, delivered, len(data)))

    def _deliver(self, src, dst, msg, nbytes):
        yield from transfer(self.env, self.links[src], self.links[dst], nbytes, self.rng)
        self.trace.append((self.env.now, src, dst, nbytes, msg.kind))
        yield self.mailbox[dst].put(msg)

    def _drive(self, role, gen):
        value = None
        while True:
            try:
                eff, dt = self._advance(role, gen, value)
            except StopIteration:
                return
            except BaseException as exc:  # re-raised unchanged by run(); SimPy would copy it
                if self._failure is None:
                    self._failure = exc
                    self._abort.succeed()
                return
            value = None
            if dt > 0:
                self.compute_time[role] += dt
                yield self.env.timeout(dt)
            if isinstance(eff, Send):
                self._send(role, eff)
            elif isinstance(eff, Recv):
                self.waiting[role] = eff
                value = yield self.mailbox[role].get(
                    lambda m, e=eff: (e.src is None or m.src == e.src) and (e.kind is None or m.kind == e.kind))
                del self.waiting[role]
            elif isinstance(eff, Compute):
                dev = self.devices[role]
                extra = eff.seconds + (modelled_seconds(eff.flops, eff.bytes, dev)
                                       if eff.flops or eff.bytes else 0.0)
                self.compute_time[role] += extra
                yield self.env.timeout(extra)
            elif isinstance(eff, Log):
                rec = dict(eff.record)
                rec.setdefault("role", role)
                rec.update(protocol=self.protocol, sim_time=self.env.now,
                           wall_time=time.perf_counter() - self._t0, bytes=self.bytes_sent)
                self.on_log(rec)
            else:
                raise ProtocolError(f"{role}: yielded {type(eff).__name__}, expected Send, Recv, "
                                    "Compute or Log")

    def run(self, roles):
        """Run every role to completion; return engine statistics."""
        unknown = set(roles) - set(self.mailbox)
        if unknown:
            raise ProtocolError(f"roles without an endpoint: {', '.join(sorted(unknown))}")
        procs = {name: self.env.process(self._drive(name, gen)) for name, gen in roles.items()}
        try:
            self.env.run(until=self.env.all_of(list(procs.values())) | self._abort)
        except RuntimeError as exc:
            if "No scheduled events left" not in str(exc):
                raise
        if self._failure is not None:
            raise self._failure
        stuck = [n for n, p in procs.items() if p.is_alive]
        if stuck:
            waits = "; ".join(f"{n} waits for {self.waiting[n]}" for n in stuck if n in self.waiting)
            raise ProtocolError(f"deadlock at sim time {self.env.now:.6f}s: {waits or ', '.join(stuck)}")
        return self.stats()

    def stats(self):
        return {
            "sim_time": self.env.now, "bytes": self.bytes_sent, "messages": self.messages,
            "links": {n: {"bytes_up": l.bytes_up, "bytes_down": l.bytes_down}
                      for n, l in self.links.items()},
            "compute_time": dict(self.compute_time),
        }
