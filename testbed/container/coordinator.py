"""The coordinator process of a container run.

    python -m testbed.container coordinator      (env: see testbed/container/settings.py)

It creates the run directory (``mode: containers``), admits the parties as they
register (each is the party its certificate names) and sends each the address table; then the parties shape their links and measure them,
and for the scenario's protocol and each of its baselines the coordinator starts the
protocol everywhere, runs its own server-side roles (``coordinator``, ``cloud``,
``server``, ``site``, ...) and waits for every party's statistics.  At the end it merges
every process's part into one run directory (:mod:`testbed.container.merge`), writes
the summary and prints it.  Progress: one line per training step, on stdout.

A party that fails sends its error, which fails the run naming the party and the
cause; a party whose connection drops before it said goodbye (killed, e.g. over its
memory limit) fails it as well; either way the others are told to abort, and the run
directory ends ``failed`` with that error instead of hanging.
"""
import logging
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

from parties.base import party_name
from parties.registry import get_protocol
from testbed.errors import TransportError
from testbed.rundir import RunDir
from testbed.run.summary import format_summary, summarize

from .merge import combine_stats, merge_parts
from .process import COORDINATOR, PartWriter, Process, RemoteFailure, drop_privileges, process_link
from .shaping import apply_shaping, emulation_for
from .shards import DataView, Unavailable, coordinator_view, load_init_model

log = logging.getLogger(__name__)
ABORT_WAIT_S = 30   # how long live parties get to flush their parts and say goodbye


def protocol_roles(scenario, name, data, init_model):
    """Role names protocol ``name`` uses (its constructor only; nothing runs)."""
    import copy

    from parties.base import RoleContext
    ctx = RoleContext(scenario=scenario, vocab_size=data.vocab_size, parties=data.parties,
                      device=None, build_model=lambda: copy.deepcopy(init_model), protocol_name=name)
    return get_protocol(name)(ctx).role_names()


def parties_needed(scenario):
    """How many party processes the run needs: ``parties.count``, or none when every
    protocol of the run (its protocol and baselines) is single-site."""
    view = DataView(scenario.data.tokenizer.vocab_size,
                    [Unavailable(party_name(i), "coordinator") for i in range(scenario.parties.count)])
    for name in dict.fromkeys([scenario.protocol.name, *scenario.baselines]):
        if any(r.startswith("party-") for r in protocol_roles(scenario, name, view, None)):
            return scenario.parties.count
    return 0


class Coordinator(Process):
    def __init__(self, settings, scenario):
        super().__init__(COORDINATOR, settings, scenario)
        self.phases = list(dict.fromkeys([scenario.protocol.name, *scenario.baselines]))
        self.parties = {}          # name -> (host, port)
        self.gone = set()          # parties that said goodbye or reported their own error
        self.dead = set()          # parties whose connection ended: nothing more will come
        self.registration_closed = False
        self.links = {}

    # -- transport callbacks ---------------------------------------------------------------
    def on_control(self, msg, address):
        if msg.kind == "_progress":
            self.progress(msg.meta)
            return
        if msg.kind == "_register" and self.registration_closed:
            self._reject(msg, address, f"all {len(self.parties)} parties have registered already "
                                       "(PARTIES must equal the scenario's parties.count)")
            return
        if msg.kind == "_error":
            self.gone.add(msg.src)
            m = msg.meta
            self.fail(RemoteFailure(f"{msg.src} failed in role {m.get('role')}: {m.get('error')}",
                                    m.get("exit_code", 1)))
        if msg.kind == "_bye":
            self.gone.add(msg.src)
        super().on_control(msg, address)

    def unexpected(self, msg, address, waiting_for):
        if msg.kind == "_register":   # arrived just as the last place was taken
            self._reject(msg, address, f"all {len(self.parties)} parties have registered already")
        else:
            super().unexpected(msg, address, waiting_for)

    def on_lost(self, peer, reason):
        self.dead.add(peer)
        if peer in self.parties and peer not in self.gone:
            self.fail(RemoteFailure(
                f"{peer}: connection lost before it finished ({reason}); the process died -- killed "
                "(over its container's memory limit?) or crashed; see its container's state and logs"))

    def progress(self, rec):
        loss = rec.get("loss")
        step = rec.get("step")
        step = step + 1 if isinstance(step, int) else step
        print(f"[{rec.get('protocol')}] {rec.get('party')} step {step}/{self.scenario.training.steps}"
              + (f" loss {loss:.4f}" if isinstance(loss, (int, float)) else ""), flush=True)

    # -- the run -----------------------------------------------------------------------------
    def run(self):
        """Run the whole scenario; returns the process exit code."""
        sc, st = self.scenario, self.settings
        self.links = {COORDINATOR: process_link(sc, COORDINATOR)}
        self.shaping = apply_shaping(self.links[COORDINATOR], st.link_dev, st.shaping)
        drop_privileges()
        rundir = RunDir(st.results_dir, sc, mode="containers", name=st.run_name)
        parts = Path(st.parts_root(rundir.path.name))
        if not st.parts_dir:   # parties that dropped to another user make their part directories here
            parts.mkdir(parents=True, exist_ok=True)
            os.chmod(parts, 0o1777)
        self.writer = PartWriter(parts / COORDINATOR)
        print(f"run directory: {rundir.path}", flush=True)
        try:
            self._copy_prepared(rundir.path)
            results = self._run(rundir)
            self.writer.close()
            merge_parts(rundir, parts, sc, self.phases)
            summary = summarize(sc, rundir.path, results)
            rundir.write_json("summary.json", summary)
            if sc.attacks:
                from testbed.run.runner import _run_attacks
                _run_attacks(rundir.path, sc)
            rundir.close()
            shutil.rmtree(parts, ignore_errors=True)
            _remove_if_empty(parts.parent)
            if os.environ.get("PRINT_SUMMARY", "1") != "0":
                print(format_summary(summary), flush=True)
            print(f"run finished: {rundir.path}", flush=True)
            return 0
        except BaseException as exc:  # noqa: BLE001 -- every failure ends the run as 'failed'
            # a second stop (``docker stop``) must not cut the merge short: it is what keeps the lines
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RemoteFailure) else str(exc)
            if getattr(exc, "role", None):
                error = f"coordinator failed in role {exc.role}: {error}"
            if isinstance(exc, KeyboardInterrupt):
                error = "interrupted (the coordinator was stopped)"
            print(f"error: {error}", file=sys.stderr, flush=True)
            self._abort(error)
            try:
                self.writer.close()
                merge_parts(rundir, parts, sc, self.phases)
            except Exception as merge_exc:  # the run stays failed; say what else went wrong
                log.warning("could not merge the parts of the failed run: %s", merge_exc)
            rundir.close(status="failed", error=error)
            return getattr(exc, "exit_code", 130 if isinstance(exc, KeyboardInterrupt) else 1)
        finally:
            self.closing = True
            self.node.close()

    def _copy_prepared(self, run_path):
        data = Path(self.settings.data_dir)
        shutil.copy(data / "public" / "tokenizer.json", run_path / "public" / "tokenizer.json")
        shutil.copytree(data / "public" / "init-model", run_path / "public" / "init-model")
        for name in ("canaries.json", "partition.json", "records.jsonl"):
            shutil.copy(data / "truth" / name, run_path / "truth" / name)

    def _run(self, rundir):
        sc, st = self.scenario, self.settings
        n = sc.parties.count
        init_model = load_init_model(Path(st.data_dir) / "public", sc)
        view, _ = coordinator_view(st.data_dir, sc, pooled=False)
        roles = {name: protocol_roles(sc, name, view, init_model) for name in self.phases}
        pooled = {name: not any(r.startswith("party-") for r in rs) for name, rs in roles.items()}
        needed = 0 if all(pooled.values()) else n
        self.links.update({party_name(i): process_link(sc, party_name(i)) for i in range(needed)})
        rundir.update_manifest(containers={"parties": needed, "shaping": self.shaping["detail"]})
        self._register(needed)
        self._start_parties(rundir.path.name)
        results = {}
        for k, name in enumerate(self.phases):
            data = coordinator_view(st.data_dir, sc, pooled=True)[0] if pooled[name] else view
            results[name] = self._phase(k, name, data, init_model)
        for p in self.parties:
            self.tell(p, "_finish")
        self._collect(set(self.parties), "_bye", "every party's goodbye (parts written)",
                      timeout=st.register_timeout)
        return results

    def _register(self, n):
        print(f"waiting for {n} parties to register on port {self.node.port}", flush=True)
        while len(self.parties) < n:
            msg, address = self.next_control(self.settings.register_timeout,
                                             f"{n - len(self.parties)} more of {n} parties to register",
                                             kinds=("_register",))
            # msg.src is the name on the certificate its connection showed (the transport checks)
            name, m = msg.src, msg.meta
            index = int(name.split("-")[1]) if re.fullmatch(r"party-\d+", name or "") else None
            if index is None or not 0 <= index < n or name in self.parties:
                why = "registered already" if name in self.parties else "not a party of this run"
                self._reject(msg, address, f"{name} is {why} (parties.count is {n})")
                continue
            host, port = m.get("host") or address[0], int(m["port"])
            self.parties[name] = (host, port)
            self.node.add_peer(name, (host, port),
                               emulation_for(self.links[COORDINATOR], self.links[name], self.shaping))
            print(f"registered {name} at {host}:{port}", flush=True)
        self.registration_closed = True

    def _reject(self, msg, address, reason):
        self.node.add_peer(msg.src, (msg.meta.get("host") or address[0], int(msg.meta["port"])))
        self.tell(msg.src, "_reject", reason=reason)
        log.warning("rejected the registration of %s: %s", msg.src, reason)

    def _start_parties(self, run_name):
        processes = {p: list(a) for p, a in self.parties.items()}
        links = {p: cfg.model_dump() for p, cfg in self.links.items()}
        for p in self.parties:
            self.tell(p, "_table", you=p, run=run_name, processes=processes, links=links)
        self._collect(set(self.parties), "_ack", "every party to load its shard and shape its link",
                      timeout=self.settings.register_timeout)
        # one process at a time: concurrent probes (and their ACKs) would share the links
        self.measure_links(sorted(self.parties), self.links)
        for p in sorted(self.parties):
            self.tell(p, "_measure")
            self._collect({p}, "_ready", f"{p} to measure its links", timeout=self.settings.register_timeout)

    def _collect(self, expected, kind, what, timeout=None):
        got = {}
        while set(got) < expected:
            msg, _ = self.next_control(timeout, f"{what} ({', '.join(sorted(expected - set(got)))})",
                                       kinds=(kind,))
            got[msg.src] = msg.meta
        return got

    def _phase(self, k, name, data, init_model):
        t0 = time.time()
        print(f"[{name}] start", flush=True)
        for p in self.parties:
            self.tell(p, "_phase", index=k, name=name, main=k == 0, t0=t0)

        def on_log(rec):
            self.writer.metric(rec)
            if rec.get("event") == "train":
                self.progress(rec)

        own = self.run_phase(name, k == 0, t0, data, init_model, on_log)
        stats = self._collect(set(self.parties), "_phase_done", f"{name} to finish on every party",
                              timeout=None)
        merged = combine_stats([own, *(s["stats"] for s in stats.values())])
        self.writer.metric({"event": "engine", "protocol": name, "mode": "containers",
                            **{k2: v for k2, v in merged.items() if k2 != "memory"}})
        print(f"[{name}] done in {time.time() - t0:.1f}s, {merged['bytes']} bytes in "
              f"{merged['messages']} messages", flush=True)
        return merged

    def _abort(self, reason):
        live = [p for p in self.parties if p not in self.gone and p not in self.dead]
        for p in live:
            try:
                self.tell(p, "_abort", reason=reason)
            except TransportError:
                pass
        # parties flush their parts before they say goodbye; one whose connection ended is dead
        # (killed) and will say nothing: its part is merged as it stands
        deadline = time.monotonic() + ABORT_WAIT_S
        while any(p not in self.gone and p not in self.dead for p in live) and time.monotonic() < deadline:
            time.sleep(0.1)


def main(settings, scenario):
    return Coordinator(settings, scenario).run()


def _remove_if_empty(path):
    try:
        path.rmdir()
    except OSError:
        pass
