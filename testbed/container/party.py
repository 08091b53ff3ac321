"""A party process of a container run.

    python -m testbed.container party      (env: see testbed/container/settings.py)

Is party ``PARTY`` (or, under plain ``docker compose up`` with replicas, the replica
number minus one: replica ``<project>-party-1`` is ``party-0``), with that name's
certificate; registers with the coordinator, receives the address table and every
process's link; loads only its own shard
(``DATA_DIR/party-<i>/``) and the public starting checkpoint; shapes its link; measures
its links; then runs its role (``party-<i>``) of each protocol the coordinator starts,
talking to the other roles directly, and writes its part of the run directory.  An
error in its role is sent to the coordinator (and ends this process with the error's
exit code); an abort from the coordinator ends it with exit code 10 (``ABORTED``: the
cause is elsewhere), and losing the coordinator with the transport error's code.
"""
import logging
import os
import threading
from pathlib import Path

from parties.base import party_name
from testbed.engine.codec import Message
from testbed.errors import TransportError
from testbed.scenario import LinkCfg

from .process import (COORDINATOR, PartWriter, Process, RemoteFailure, drop_privileges,
                      effective_capabilities)
from .isolation import restrict_routes
from .replica import replica_index
from .shaping import apply_shaping, emulation_for
from .settings import ABORTED
from .shards import load_init_model, party_view

log = logging.getLogger(__name__)


class Party(Process):
    def __init__(self, settings, scenario):
        self.replica = None   # the compose container name, when the index came from it
        if settings.party is not None:
            index = settings.party
        else:
            index, self.replica = replica_index()
        self.finished = False
        self.coordinator_gone = threading.Event()
        super().__init__(party_name(index), settings, scenario)

    def on_control(self, msg, address):
        if msg.kind == "_abort":
            self.fail(RemoteFailure(f"aborted by the coordinator: {msg.meta.get('reason')}"))
        super().on_control(msg, address)

    def on_lost(self, peer, reason):
        if peer == COORDINATOR:
            self.coordinator_gone.set()
            if not self.finished:
                self.fail(TransportError(f"{self.name}: lost the coordinator ({reason})"))

    def run(self):
        """Take part in the run; returns the process exit code."""
        st, sc = self.settings, self.scenario
        self.node.add_peer(COORDINATOR, st.coordinator)
        try:
            self.tell(COORDINATOR, "_register", index=st.party, port=self.node.port,
                      host=st.advertise_host)
            msg, _ = self.next_control(st.register_timeout, "the coordinator's address table",
                                       kinds=("_table", "_reject"))
            if msg.kind == "_reject":
                print(f"registration rejected: {msg.meta.get('reason')}", flush=True)
                return 2
            table = msg.meta
            index = int(self.name.split("-")[1])
            data, public = party_view(st.data_dir, sc, index, self.name)
            init_model = load_init_model(public, sc)
            links = {p: LinkCfg(**cfg) for p, cfg in table["links"].items()}
            shaping = apply_shaping(links[self.name], st.link_dev, st.shaping)
            peers = [p for p in table["processes"] if p != self.name]
            isolation = ""
            if st.shaping != "off":   # a container: nothing but the run's processes is reachable
                where = [st.coordinator[0], *(table["processes"][p][0] for p in peers)]
                isolation = "; " + restrict_routes(where, st.link_dev)
            drop_privileges()
            isolation += f"; uid {os.getuid()}, capabilities {effective_capabilities():#x}"
            self.node.set_emulation(COORDINATOR,
                                    emulation_for(links[self.name], links[COORDINATOR], shaping))
            for p in peers:
                self.node.add_peer(p, table["processes"][p],
                                   emulation_for(links[self.name], links[p], shaping))
            self.writer = PartWriter(Path(st.parts_root(table["run"])) / self.name)
            replica = f" (container {self.replica})" if self.replica else ""
            print(f"{self.name}{replica}: registered; link {shaping['detail']}{isolation}", flush=True)
            self.tell(COORDINATOR, "_ack")
            return self._serve(peers, links, data, init_model)
        except RemoteFailure as exc:
            print(f"{self.name}: {exc}", flush=True)
            self._goodbye("_bye")
            return ABORTED
        except BaseException as exc:  # noqa: BLE001 -- report the failure, then exit with its code
            role = getattr(exc, "role", None) or self.name
            error = f"{type(exc).__name__}: {exc}"
            print(f"{self.name}: error in {role}: {error}", flush=True)
            self._goodbye("_error", role=role, error=error, exit_code=getattr(exc, "exit_code", 1))
            return getattr(exc, "exit_code", 130 if isinstance(exc, KeyboardInterrupt) else 1)
        finally:
            self.finished = self.closing = True
            self.node.close()

    def _goodbye(self, kind, **meta):
        """Close this process's part (so the coordinator can merge it), then say so."""
        self.finished = True
        if self.writer is not None:
            self.writer.close()
        try:
            self.tell(COORDINATOR, kind, **meta)
            self.node.flush(timeout=10)
        except TransportError as exc:
            log.warning("%s: could not tell the coordinator %s: %s", self.name, kind, exc)
            return
        # exit only after the coordinator: under `docker compose up --exit-code-from coordinator`
        # the first container to exit stops the others, and the coordinator may still be merging
        if not self.coordinator_gone.wait(self.settings.recv_timeout):
            log.warning("%s: the coordinator is still running %.0fs after %s", self.name,
                        self.settings.recv_timeout, kind)

    def _serve(self, peers, links, data, init_model):
        while True:
            msg, _ = self.next_control(None, "the coordinator's next instruction",
                                       kinds=("_measure", "_phase", "_finish"))
            if msg.kind == "_measure":
                self.measure_links([COORDINATOR, *peers], links)
                self.tell(COORDINATOR, "_ready")
            elif msg.kind == "_phase":
                m = msg.meta
                stats = self.run_phase(m["name"], m["main"], m["t0"], data, init_model,
                                       lambda rec, p=m["name"]: self._on_log(p, rec))
                self.node.send_message(COORDINATOR, Message(kind="_phase_done", src=self.name,
                                                            meta={"index": m["index"], "stats": stats}))
            else:
                self._goodbye("_bye")
                return 0

    def _on_log(self, protocol, rec):
        self.writer.metric(rec)
        if rec.get("event") == "train":
            self.tell(COORDINATOR, "_progress", protocol=protocol, party=rec.get("party"),
                      step=rec.get("step"), loss=rec.get("loss"))


def main(settings, scenario):
    return Party(settings, scenario).run()
