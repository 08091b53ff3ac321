"""Assemble one run directory from the parts every container process wrote.

Each process writes ``PARTS/<process>/``: ``metrics.jsonl`` and ``truth/tokens.jsonl``
(every line stamped with ``_ts``, epoch seconds) and, for the scenario's protocol,
``capture/`` -- the messages *its* roles sent, so each message is captured exactly once,
by its sender.  The coordinator merges them into the layout of the embedded engine
(:mod:`testbed.rundir`): metrics and truth interleaved by time, the capture ordered by
send time (seconds since the protocol started, on the hosts' shared clock) and numbered
afresh, tensors re-keyed ``<seq>/<name>`` into ``capture/tensors/<protocol>-step<N>``.
When the coordinator itself died, :func:`recover_run` does the same from the host.
"""
import datetime as dt
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from testbed.run import capture_policy
from testbed.run.capture import CaptureWriter
from testbed.engine.codec import DTYPES, Message
from testbed.rundir import iter_jsonl, route_record


log = logging.getLogger(__name__)


def _lines(path):
    return list(iter_jsonl(path))   # stops at a torn last line of a killed process


def _role_order(role):
    return (0, int(role.split("-")[1]), "") if role.startswith("party-") else (1, 0, role)


def combine_stats(stats):
    """One protocol's statistics from every process's (the embedded engine's keys)."""
    out = {"sim_time": max((s["sim_time"] for s in stats), default=0.0),
           "bytes": sum(s["bytes"] for s in stats), "messages": sum(s["messages"] for s in stats),
           "links": {}, "compute_time": {}, "modelled_compute_time": {}, "memory": {}}
    for key in ("links", "compute_time", "modelled_compute_time", "memory"):
        merged = {}
        for s in stats:
            merged.update({r: v for r, v in s.get(key, {}).items() if r in s.get("roles", ())})
        out[key] = {r: merged[r] for r in sorted(merged, key=_role_order)}
    return out


def merge_parts(rundir, parts_root, scenario, phases):
    """Write the merged metrics, truth and capture of ``parts_root`` into ``rundir``."""
    parts = sorted(p for p in Path(parts_root).iterdir() if p.is_dir()) if Path(parts_root).is_dir() else []
    metrics = sorted((r for p in parts for r in _lines(p / "metrics.jsonl")), key=lambda r: r["_ts"])
    for r in metrics:
        rundir.metric({k: v for k, v in r.items() if k != "_ts"})
    truth = sorted((r for p in parts for r in _lines(p / "truth" / "tokens.jsonl")), key=lambda r: r["_ts"])
    for r in truth:
        rundir.truth(r["protocol"], r["party"], r["step"], torch.tensor(r["input_ids"], dtype=torch.int64))
    routes = sorted((r for p in parts for r in _lines(p / "truth" / "routes.jsonl")), key=lambda r: r["_ts"])
    for r in routes:
        rundir.route(**{k: v for k, v in r.items() if k != "_ts"})
    if scenario.capture.enabled and phases:
        _merge_capture(rundir.path / "capture", parts, phases[0],
                       capture_policy.resolve(scenario.capture, phases[0], scenario.attacks))


def _merge_capture(out_dir, parts, protocol, keep_tensors):
    entries = []
    for p in parts:
        for r in _lines(p / "capture" / "index.jsonl"):
            entries.append((r["sim_time"], p.name, r["seq"], p, r))
    entries.sort(key=lambda e: e[:3])
    writer = CaptureWriter(out_dir, protocol, tensors=keep_tensors)
    files, step = {}, None
    try:
        for _, _, _, part, r in entries:
            if r["step"] != step:
                files, step = {}, r["step"]   # hold one step's tensor files at a time
            tensors = {}
            for name, info in r["tensors"].items():
                if r.get("file"):
                    path = part / "capture" / r["file"]
                    if path not in files:
                        files[path] = load_file(str(path))
                    tensors[name] = files[path][info["key"]]
                else:   # capture without tensors: only dtype and shape are recorded
                    tensors[name] = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
            msg = Message(kind=r["kind"], src=r["src"], dst=r["dst"], step=r["step"], meta=r["meta"],
                          tensors=tensors)
            writer.record(msg, r["bytes"], r["header_bytes"], r["sim_time"])
    finally:
        writer.close()
    log.info("capture: merged %d messages from %d parts", len(entries), len(parts))


class _Reopened:
    """An existing run directory, written the way :class:`testbed.rundir.RunDir` writes it."""

    def __init__(self, path):
        self.path = Path(path)
        (self.path / "truth").mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.path / "metrics.jsonl", "w", buffering=1)
        self._truth = open(self.path / "truth" / "tokens.jsonl", "w", buffering=1)
        self._routes = None

    def metric(self, record):
        self._metrics.write(json.dumps(record, sort_keys=True) + "\n")

    def truth(self, protocol, party, step, input_ids):
        self._truth.write(json.dumps({"protocol": protocol, "party": party, "step": step,
                                      "input_ids": input_ids.tolist()}) + "\n")

    def route(self, protocol, party, step, layer, host, positions, eval=False):
        if self._routes is None:
            self._routes = open(self.path / "truth" / "routes.jsonl", "w", buffering=1)
        self._routes.write(json.dumps(route_record(protocol, party, step, layer, host, positions, eval)) + "\n")

    def close(self):
        self._metrics.close()
        self._truth.close()
        if self._routes is not None:
            self._routes.close()


def recover_run(run_path, parts_root, scenario, error):
    """Finish the run directory of a run whose coordinator died before it did: merge every
    process's part afresh (whatever a half-done merge left is replaced) and mark the
    manifest ``failed`` with ``error``.  The parts are left where they are."""
    run_path = Path(run_path)
    for stale in (run_path / "capture" / "index.jsonl", *(run_path / "capture" / "tensors").glob("*")):
        stale.unlink(missing_ok=True)
    out = _Reopened(run_path)
    try:
        merge_parts(out, parts_root, scenario, list(dict.fromkeys([scenario.protocol.name, *scenario.baselines])))
    finally:
        out.close()
    manifest_path = run_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(status="failed", error=error,
                    end=manifest.get("end") or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)
    return manifest
