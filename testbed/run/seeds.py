"""Several seeds of one scenario: one child run directory per seed, mean ± 95% CI on top.

``run_seeds(scenario, [0, 1, 2], runs_root)`` writes::

    runs/<scenario>-<timestamp>/      the parent
      scenario.yaml                   the scenario as given (``seeds`` filled in)
      manifest.json                   kind: seeds, the seeds, their children, status
      summary.json                    per protocol: final and best held-out loss,
                                      mean ± 95% CI (t) over seeds, paired differences
      seed-0/ seed-1/ seed-2/         each an ordinary run directory (seed set, no ``seeds``)

A single seed runs as before into one ordinary run directory.  Differences between
protocols are paired by seed (the same seed gives every protocol of a child the same
data and init) and printed as "no difference" unless larger than their CI half-width.

    python -m testbed run scenarios/pcmoe-flagship.yaml --seeds 0,1,2
"""
import datetime as dt
import json
import os
from pathlib import Path

import yaml

from testbed.errors import ConfigError
from testbed.rundir import _now
from testbed.stats import claim, fmt_ci, mean_ci, paired

from .runner import run_scenario

REFERENCE = "centralized"


def parse_seeds(text):
    """'0,1,2' -> [0, 1, 2]; '0-4' -> [0, 1, 2, 3, 4]; ConfigError on anything else."""
    out = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                out += list(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise ConfigError("--seeds", [f"expected integers like 0,1,2 or 0-4 (got {text!r})"]) from None
    if not out or len(set(out)) != len(out):
        raise ConfigError("--seeds", [f"expected distinct integers like 0,1,2 (got {text!r})"])
    return out


def _parent(runs_root, scenario, name):
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = path = Path(runs_root) / (name or f"{scenario.name}-{stamp}")
    i = 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    path.mkdir(parents=True)
    return path


def _write(path, obj):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def run_seeds(scenario, seeds, runs_root="runs", run_name=None, on_seed=None, **kw):
    """Run ``scenario`` once per seed; return (run directory, summary).

    One seed: an ordinary run directory (``run_scenario``).  Several: a parent with one
    child per seed and :func:`summarize_seeds` as its ``summary.json``.  ``on_seed(seed,
    path, summary)`` is called as each child finishes; ``kw`` goes to ``run_scenario``."""
    seeds = list(seeds)
    if len(seeds) == 1:
        sc = scenario.model_copy(update={"seed": seeds[0], "seeds": None})
        return run_scenario(sc, runs_root=runs_root, run_name=run_name, **kw)
    parent = _parent(runs_root, scenario, run_name)
    (parent / "scenario.yaml").write_text(
        yaml.safe_dump({**scenario.resolved(), "seeds": seeds}, sort_keys=False))
    manifest = {"kind": "seeds", "scenario": scenario.name, "seeds": seeds, "children": [],
                "status": "running", "start": _now(), "end": None, "error": None}
    _write(parent / "manifest.json", manifest)
    children = []
    try:
        for s in seeds:
            sc = scenario.model_copy(update={"seed": s, "seeds": None})
            path, summary = run_scenario(sc, runs_root=parent, run_name=f"seed-{s}", **kw)
            children.append((s, path, summary))
            manifest["children"].append(path.name)
            _write(parent / "manifest.json", manifest)
            if on_seed:
                on_seed(s, path, summary)
    except BaseException as exc:
        manifest.update(status="failed", error=f"{type(exc).__name__}: {exc}", end=_now())
        _write(parent / "manifest.json", manifest)
        exc.run_dir = getattr(exc, "run_dir", parent)
        raise
    summary = summarize_seeds(parent, scenario.name, children)
    _write(parent / "summary.json", summary)
    manifest.update(status="ok", end=_now())
    _write(parent / "manifest.json", manifest)
    return parent, summary


def summarize_seeds(parent, name, children):
    """``children``: [(seed, path, single-run summary)] -> the parent's summary dict."""
    protos = list(dict.fromkeys(p for _, _, s in children for p in s["protocols"]))
    out = {"run": str(parent), "scenario": name, "kind": "seeds",
           "seeds": [s for s, _, _ in children],
           "children": {str(s): str(Path(p).name) for s, p, _ in children},
           "reference": REFERENCE if REFERENCE in protos else None, "protocols": {}}
    series = {p: {k: [s["protocols"].get(p, {}).get(k) for _, _, s in children]
                  for k in ("mean_eval_loss", "best_eval_loss", "sim_time")} for p in protos}
    for p in protos:
        entry = {"final": mean_ci(series[p]["mean_eval_loss"]),
                 "best": mean_ci(series[p]["best_eval_loss"]),
                 "sim_time": mean_ci(series[p]["sim_time"]),
                 "per_seed": {"final": series[p]["mean_eval_loss"], "best": series[p]["best_eval_loss"]},
                 # the keys a single-run summary has, so tools reading either keep working
                 "mean_eval_loss": mean_ci(series[p]["mean_eval_loss"])["mean"]}
        if out["reference"] and p != REFERENCE:
            ref = series[REFERENCE]
            entry["final_vs_reference"] = paired(series[p]["mean_eval_loss"], ref["mean_eval_loss"])
            entry["best_vs_reference"] = paired(series[p]["best_eval_loss"], ref["best_eval_loss"])
        out["protocols"][p] = entry
    return out


def format_seed_summary(summary):
    """The terminal table: mean ± 95% CI per protocol, and the paired difference to the
    reference ("no difference" unless it exceeds its half-width)."""
    ref = summary.get("reference")
    n = len(summary["seeds"])
    lines = [f"run: {summary['run']}  ({n} seeds: {', '.join(map(str, summary['seeds']))}; "
             "mean ± 95% CI, t-distribution)", "",
             f"{'protocol':<22}{'final eval loss':>20}{'best eval loss':>20}"
             + (f"{'final - ' + ref:>26}{'best - ' + ref:>26}" if ref else "")]
    for name, p in summary["protocols"].items():
        row = f"{name:<22}{fmt_ci(p['final']):>20}{fmt_ci(p['best']):>20}"
        if ref:
            row += (f"{claim(p['final_vs_reference']):>26}{claim(p['best_vs_reference']):>26}"
                    if "final_vs_reference" in p else f"{'-':>26}{'-':>26}")
        lines.append(row)
    lines += ["", "children: " + ", ".join(summary["children"].values())]
    return "\n".join(lines)
