"""What the coordinator and party processes share: transport node, mailbox, control
messages, the part of the run directory each writes, and running one protocol.

Placement: role ``party-<i>`` runs in the container of party ``i``; every other role
(``coordinator``, ``cloud``, ``server``, ``site``, ...) runs in the coordinator's.

Control messages are codec messages whose kind starts with ``_``; they travel in the
same mutual-TLS connections as the protocol's (a process's name is its certificate's,
:mod:`testbed.net.identity`) but never reach a role, the capture or the byte counts.
Registration and start-up::

    party -> coordinator   _register {index, port, host?}
    coordinator -> party   _table {you, run, parties, processes, links}   (or _reject)
    party -> coordinator   _ack                 (shard loaded, link shaped)
    coordinator -> party   _measure             (ping / probe every peer; one party at a time)
    party -> coordinator   _ready

then per protocol ``_phase {index, name, main, t0}`` -> the roles run -> ``_phase_done
{stats}`` (or ``_error {role, error, exit_code}``), with ``_progress`` per train step;
finally ``_finish`` -> ``_bye`` (parts flushed), or ``_abort {reason}`` on a failure.
"""
import json
import logging
import os
import queue
import time
from pathlib import Path

from testbed.run.capture import CaptureWriter
from testbed.engine.codec import Message
from testbed.net.engine import ContainerEngine, Mailbox
from testbed.errors import TestbedError, TransportError
from testbed.run.runner import build_roles, endpoint_configs
from testbed.rundir import route_record
from testbed.net.identity import Identity
from testbed.net.transport import Node

log = logging.getLogger(__name__)

COORDINATOR = "coordinator"
PINGS = 5


def host_of(role):
    """The process that hosts ``role``."""
    return role if role.startswith("party-") else COORDINATOR


def process_link(scenario, process):
    """The LinkCfg of a process's container."""
    return endpoint_configs(scenario, [process])[process][1]


def drop_privileges():
    """With RUN_AS=uid:gid, switch to that user once the link is shaped (tc needs root):
    the files this process writes then belong to that user, and -- leaving uid 0 -- the
    process loses every capability, NET_ADMIN included (checked).  Returns the effective
    capability mask after the switch, or None when nothing changed."""
    spec = os.environ.get("RUN_AS", "")
    if not spec or os.getuid() != 0:
        return None
    uid, _, gid = spec.partition(":")
    os.setgroups([])
    os.setgid(int(gid or uid))
    os.setuid(int(uid))
    os.environ["HOME"] = "/tmp"
    caps = effective_capabilities()
    if int(uid) != 0 and caps:
        raise TestbedError(f"RUN_AS={spec}: capabilities {caps:#x} survived the switch to uid {uid}")
    return caps


def effective_capabilities():
    """This process's effective capability mask (CapEff of /proc/self/status; 0 when unknown)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


class RemoteFailure(TestbedError):
    """Another process of the run failed; carries its exit code."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


class PartWriter:
    """One process's part of the run directory: metrics, truth, capture (merged later
    by the coordinator, :mod:`testbed.container.merge`).  Every line carries ``_ts``
    (epoch seconds) so the parts can be interleaved in time."""

    def __init__(self, root):
        self.root = Path(root)
        (self.root / "truth").mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.root / "metrics.jsonl", "a", buffering=1)
        self._truth = open(self.root / "truth" / "tokens.jsonl", "a", buffering=1)
        self._routes = None   # truth/routes.jsonl, opened by the first routed message (PC-MoE)

    def metric(self, record):
        self._metrics.write(json.dumps({**record, "_ts": time.time()}, sort_keys=True) + "\n")

    def truth(self, protocol, party, step, input_ids):
        self._truth.write(json.dumps({"protocol": protocol, "party": party, "step": step,
                                      "input_ids": input_ids.tolist(), "_ts": time.time()}) + "\n")

    def route(self, protocol, party, step, layer, host, positions, eval=False):
        if self._routes is None:
            self._routes = open(self.root / "truth" / "routes.jsonl", "a", buffering=1)
        self._routes.write(json.dumps(route_record(protocol, party, step, layer, host, positions, eval,
                                                   _ts=time.time())) + "\n")

    def capture(self, protocol, tensors):
        return CaptureWriter(self.root / "capture", protocol, tensors=tensors)

    def close(self):
        self._metrics.close()
        self._truth.close()
        if self._routes is not None:
            self._routes.close()


class _Hosted:
    def __init__(self, process):
        self.process = process

    def __contains__(self, role):
        return host_of(role) == self.process


class Process:
    """Base of the coordinator and party processes."""

    def __init__(self, name, settings, scenario):
        self.name, self.settings, self.scenario = name, settings, scenario
        self.mailbox = Mailbox()
        self.control = queue.Queue()
        self.writer = None
        self.closing = False
        # connecting may have to wait for a peer still starting (a coordinator importing torch)
        # the plain compose file's coordinator may still be making the credentials
        identity = Identity.wait_for(settings.credentials_dir, name, settings.register_timeout)
        self.node = Node(identity, port=settings.port,
                         max_frame=settings.max_frame, on_message=self._on_message,
                         on_disconnect=self._on_disconnect, owner=host_of,
                         connect_timeout=settings.register_timeout, seed=scenario.seed)

    # -- transport callbacks (reader threads) ----------------------------------------------
    def _on_message(self, msg, address, nbytes):
        if msg.kind.startswith("_"):
            self.on_control(msg, address)
            return
        if host_of(msg.dst) != self.name:
            raise TransportError(f"message {msg.kind!r} from {msg.src} is for {msg.dst!r}, which "
                                 f"{self.name} does not host")
        self.mailbox.put(msg, nbytes)

    def on_control(self, msg, address):
        self.control.put((msg, address))

    def _on_disconnect(self, peer, reason):
        if not self.closing:
            self.on_lost(peer, reason)

    def on_lost(self, peer, reason):
        """A connection from (or the link to) ``peer`` ended; subclasses decide if fatal."""

    def fail(self, exc):
        """Stop whatever this process is running (the engine and control waits raise ``exc``)."""
        self.mailbox.fail(exc)
        self.control.put((Message(kind="_failed", meta={"error": str(exc)}), None))

    def next_control(self, timeout, waiting_for, kinds=None):
        """The next control message (of ``kinds``), raising the failure if one happened."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.mailbox.failure is not None:
                raise self.mailbox.failure
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TransportError(f"{self.name}: timed out after {timeout:.0f}s waiting for {waiting_for}")
            try:
                msg, address = self.control.get(timeout=1.0 if left is None else min(left, 1.0))
            except queue.Empty:
                continue
            if msg.kind == "_failed":
                continue
            if kinds is None or msg.kind in kinds:
                return msg, address
            self.unexpected(msg, address, waiting_for)

    def unexpected(self, msg, address, waiting_for):
        log.warning("%s: ignored control message %s from %s while waiting for %s",
                    self.name, msg.kind, msg.src, waiting_for)

    def tell(self, peer, kind, **meta):
        self.node.send_message(peer, Message(kind=kind, src=self.name, meta=meta))

    # -- measurements ------------------------------------------------------------------------
    def measure_links(self, peers, links):
        """Ping (and, with LINK_PROBE_BYTES, probe) every peer; log ``event: link``."""
        own = links[self.name]
        for peer in peers:
            # the fastest of a few: scheduling noise only ever adds to a round trip
            rtt = min(self.node.ping(peer) for _ in range(PINGS))
            rec = {"event": "link", "src": self.name, "dst": peer, "measured_by": self.name,
                   "rtt_ms": rtt * 1e3,
                   "latency_ms": rtt * 1e3 / 2,
                   "configured_latency_ms": own.latency_ms + links[peer].latency_ms,
                   "configured_mbps": min(own.up_mbps, links[peer].down_mbps)}
            if self.settings.probe_bytes:
                nbytes, seconds = self.node.probe(peer, self.settings.probe_bytes)
                rec.update(probe_bytes=nbytes, probe_mbps=nbytes * 8 / seconds / 1e6 if seconds else None)
            self.writer.metric(rec)

    def log_link_usage(self, protocol):
        for peer, r in self.node.link_report(reset=True).items():
            self.writer.metric({"event": "link", "protocol": protocol, "src": self.name, "dst": peer,
                                "measured_by": self.name, "sent_bytes": r["sent_bytes"],
                                "sent_frames": r["sent_frames"]})
            if r["recv_frames"]:
                self.writer.metric({"event": "link", "protocol": protocol, "src": peer, "dst": self.name,
                                    "measured_by": self.name, "recv_bytes": r["recv_bytes"],
                                    "recv_frames": r["recv_frames"],
                                    "achieved_mbps": r["recv_mbps"]})

    # -- one protocol --------------------------------------------------------------------------
    def run_phase(self, name, main, t0, data, init_model, on_log):
        """Run this process's roles of protocol ``name``; returns its statistics (roles
        that are not here: empty statistics)."""
        proto, ctx, roles = build_roles(self.scenario, name, data, init_model, self.writer, main,
                                        keep=_Hosted(self.name))
        locate = {r: host_of(r) for r in proto.role_names()}
        capture = None
        if main and roles and self.scenario.capture.enabled:
            # a part keeps every tensor; the merge applies capture.tensors to the whole run
            capture = self.writer.capture(name, self.scenario.capture.tensors is not False)
        engine = ContainerEngine(name, self.name, locate, self.node, self.mailbox, on_log=on_log,
                                 capture=capture, t0=t0, recv_timeout=self.settings.recv_timeout)
        try:
            stats = engine.run(roles) if roles else engine.stats()
        finally:
            if capture is not None:
                capture.close()
            for r in roles:
                self.writer.metric({"event": "memory", "protocol": name, **ctx.trackers[r].summary()})
        bytes_in, leftover = self.mailbox.reset()
        if leftover:
            log.warning("%s: %s ended with messages nobody received: %s", self.name, name, leftover)
        stats["memory"] = {r: ctx.trackers[r].summary() for r in roles}
        stats["links"] = {r: {"bytes_up": stats["bytes_up"].get(r, 0), "bytes_down": bytes_in.get(r, 0)}
                          for r in roles}
        stats["roles"] = list(roles)
        del stats["bytes_up"]
        self.log_link_usage(name)
        return stats
