"""Run a scenario in the embedded engine and write its run directory.

``run_scenario(scenario)`` prepares the data and the shared starting checkpoint, then
runs the scenario's protocol and each of its ``baselines`` on its own SimPy clock,
writing metrics, capture and truth as it goes.  Used by ``python -m testbed run``.
"""
import copy
import json
import logging
import random
import sys
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from parties.base import RoleContext, party_name
from parties.data.dataset import prepare_data
from parties.models import build_model
from parties.pretrain import starting_point
from parties.registry import get_protocol

from . import capture_policy
from .capture import CaptureWriter
from testbed.engine.devices import resolve_device
from testbed.engine.sim import SimEngine
from testbed.engine.links import resolve_link
from testbed.engine.memory import MemoryTracker
from testbed.rundir import RunDir
from .summary import summarize

log = logging.getLogger(__name__)


def endpoint_configs(scenario, role_names):
    """role -> (DeviceProfile, LinkCfg): parties from ``parties`` (+ overrides), others
    from ``coordinator``."""
    out = {}
    pc = scenario.parties
    for role in role_names:
        if role.startswith("party-"):
            o = pc.overrides.get(int(role.split("-")[1]))
            dev = (o and o.device) or pc.device
            link = (o and o.link) or pc.link
        else:
            dev, link = scenario.coordinator.device, scenario.coordinator.link
        out[role] = (resolve_device(dev), resolve_link(link))
    return out


def party_budget(scenario, role):
    from testbed.units import parse_size
    if role.startswith("party-"):
        o = scenario.parties.overrides.get(int(role.split("-")[1]))
        if o and o.memory_budget is not None:
            return parse_size(o.memory_budget)
        return scenario.parties.memory_budget
    return None


class Progress:
    """A tqdm bar over train events, or nothing."""

    def __init__(self, enabled):
        self.enabled, self.bar = enabled, None

    def start(self, label, total):
        if self.enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=label, unit="step", dynamic_ncols=True, leave=True)

    def update(self, rec):
        if self.bar is not None and rec.get("event") == "train":
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def build_roles(scenario, name, data, init_model, rundir, main, keep=None):
    """Set up protocol ``name`` for a run: returns (protocol, ctx, roles).

    ``data``: anything with ``vocab_size`` and ``parties`` (PartyData per party);
    ``rundir``: receives ``truth(protocol, party, step, ids)`` when ``main``;
    ``keep``: the role names to build (None: all) -- an engine hosting only some roles
    (a container) gets only those.  Memory trackers with the scenario's budgets are in
    ``ctx.trackers``; the scenario's transmission defences are wrapped around the roles."""
    from parties.defences import check_supported, santext

    device = torch.device(scenario.torch_device)
    original = santext.original_rows(data.parties)
    ctx = RoleContext(
        scenario=scenario, vocab_size=data.vocab_size, parties=data.parties, device=device,
        build_model=lambda: copy.deepcopy(init_model), protocol_name=name,
        record_truth=(lambda party, step, ids: rundir.truth(name, party, step, original(party, ids)))
        if main else (lambda party, step, ids: None),
        record_route=(lambda **route: rundir.route(name, **route)) if main and hasattr(rundir, "route")
        else (lambda **route: None))
    proto = get_protocol(name)(ctx)
    if main:
        check_supported(proto, scenario.defences)
    ctx.trackers = {r: MemoryTracker(r, party_budget(scenario, r), scenario.parties.on_exceed)
                    for r in proto.role_names()}
    roles = proto.roles()
    if keep is not None:
        roles = {r: g for r, g in roles.items() if r in keep}
    if scenario.defences:
        from parties.defences import wrap_roles
        roles = wrap_roles(roles, scenario.defences, ctx)
    return proto, ctx, roles


def run_protocol(name, scenario, data, init_model, rundir, main, progress):
    """Run one protocol on its own clock; return its summary pieces."""
    proto, ctx, roles = build_roles(scenario, name, data, init_model, rundir, main)
    roles_names = proto.role_names()
    capture = None
    if main and scenario.capture.enabled:
        tensors = capture_policy.resolve(scenario.capture, name, scenario.attacks)
        if not isinstance(tensors, bool):
            log.info("capture %s: tensors of %s", name, tensors.describe())
        capture = CaptureWriter(rundir.path / "capture", name, tensors=tensors)

    def on_log(rec):
        rundir.metric(rec)
        progress.update(rec)

    engine = SimEngine(name, endpoint_configs(scenario, roles_names),
                       random.Random(scenario.seed), on_log=on_log, capture=capture,
                       compute_mode=scenario.compute.mode)
    progress.start(name, proto.expected_train_logs())
    try:
        stats = engine.run(roles)
    finally:
        progress.close()
        if capture is not None:
            capture.close()
        for tr in ctx.trackers.values():
            rundir.metric({"event": "memory", "protocol": name, **tr.summary()})
    stats["memory"] = {r: t.summary() for r, t in ctx.trackers.items()}
    rundir.metric({"event": "engine", "protocol": name, **{k: v for k, v in stats.items()
                                                           if k != "memory"}})
    return stats


def run_scenario(scenario, runs_root="runs", base_dir=".", cache_dir=".cache/tokenizers",
                 progress=True, run_name=None):
    """Run everything the scenario asks for; return (run directory path, summary dict)."""
    rundir = RunDir(runs_root, scenario, mode="embedded", name=run_name)
    prog = Progress(progress)
    try:
        # the shared starting checkpoint: init.pretrain's (public text, cached) or the model's
        tokenizer, model_cfg, record = starting_point(scenario, base_dir, progress=progress)
        if record is not None:
            rundir.write_json("public/pretrain.json", record)
        data = prepare_data(scenario, Path(base_dir), Path(cache_dir) if cache_dir else None, tokenizer)
        data.tokenizer.save(str(rundir.path / "public" / "tokenizer.json"))
        rundir.write_json("truth/canaries.json", data.canaries)
        rundir.write_json("truth/partition.json", {
            party_name(i): {"train": p.record_ids, "eval": p.eval_record_ids}
            for i, p in enumerate(data.parties)})
        with open(rundir.path / "truth" / "records.jsonl", "w") as f:
            for r in data.records:
                f.write(json.dumps(r) + "\n")
        init_model = build_model(model_cfg, data.vocab_size, scenario.seed)
        hf_logging.disable_progress_bar()
        init_model.save_pretrained(rundir.path / "public" / "init-model")
        from parties.defences import santext
        text_defence = santext.apply(scenario, data, init_model)
        if text_defence:
            rundir.metric({"event": "defence", "type": "santext", **text_defence})
        results = {}
        for i, name in enumerate([scenario.protocol.name] + list(scenario.baselines)):
            if name in results:
                continue
            results[name] = run_protocol(name, scenario, data, init_model, rundir, i == 0, prog)
        summary = summarize(scenario, rundir.path, results)
        rundir.write_json("summary.json", summary)
        if scenario.attacks:
            _run_attacks(rundir.path, scenario, progress)
    except BaseException as exc:
        prog.close()
        rundir.close(status="failed", error=f"{type(exc).__name__}: {exc}")
        exc.run_dir = rundir.path
        raise
    rundir.close()
    return rundir.path, summary


def _run_attacks(run_path, scenario, progress=True):
    """The scenario's ``attacks:`` on the finished run; a line per attack and observer on
    stderr with ``progress``."""
    try:
        from attacks.runner import run_attacks
    except ImportError:
        log.warning("scenario lists attacks but the attacks module is not available; skipped")
        return
    run_attacks(run_path, scenario.attacks, progress=_stderr_line if progress else None)


def _stderr_line(line):
    print(line, file=sys.stderr, flush=True)
