"""Privacy regression gate: run the small CI scenarios with their attacks and compare
every score with its committed bound.

    python -m testbed.regress                       # run, print the table, exit 1 on any FAIL
    python -m testbed.regress --update              # rewrite values/bounds from this run
    python -m testbed.regress --only fedsgd-tiny-noised \\
        --set 'fedsgd-tiny-noised:defences=[{type: noise, sigma: 0}]'   # a weakened defence

The baseline (``privacy-baseline.yaml`` at the repository root) lists ``scenarios``
(an ``id``, a scenario ``file``, ``set`` overrides merged on top, the ``attacks`` to run
after training) and ``checks``, each naming a scenario id, an attack, optionally an
observer, a score ``metric`` and exactly one direction:

* ``min: B`` -- the attack must keep succeeding (a baseline protocol it is known to
  break: value >= B), so a broken attack cannot make everything look private;
* ``max: B`` -- the leakage must stay bounded (a defended protocol: value <= B).

A check whose score is missing (the scenario failed, the attack did not run) fails.
With several matching observers the largest score counts (the worst leak, the best
attack).  ``value`` records the score measured when the bound was last set.
Scenarios run in parallel subprocesses (see :mod:`testbed.run.sweep`).
"""
import argparse
import logging
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import ConfigError, TestbedError
from .scenario import deep_merge, read_yaml

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]   # the project: scenarios run from here
DEFAULT_BASELINE = ROOT / "privacy-baseline.yaml"
SCENARIO_KEYS = {"id", "file", "set", "attacks", "note"}
CHECK_KEYS = {"scenario", "attack", "observer", "metric", "min", "max", "value", "margin", "note"}


@dataclass
class CheckResult:
    """One evaluated check: ``value`` None when no score was found (``reason`` says why)."""

    check: dict
    value: float = None
    passed: bool = False
    reason: str = ""

    @property
    def direction(self):
        return "min" if "min" in self.check else "max"

    @property
    def bound(self):
        return self.check[self.direction]

    @property
    def name(self):
        c = self.check
        who = f"@{c['observer']}" if c.get("observer") else ""
        return f"{c['scenario']}/{c['attack']}{who}/{c['metric']}"


def check_key(c):
    """What identifies a check across a rewrite of the baseline."""
    return (c.get("scenario"), c.get("attack"), c.get("observer"), c.get("metric"), "min" in c)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_baseline(data, path):
    """Raise ConfigError listing every problem of a baseline mapping."""
    problems = []
    if not isinstance(data, dict):
        raise ConfigError(path, [f"top level: expected a mapping (got {type(data).__name__})"])
    extra = set(data) - {"margin", "scenarios", "checks"}
    problems += [f"{k}: unknown key; valid: margin, scenarios, checks" for k in sorted(extra)]
    if not _number(data.get("margin", 0.05)) or data.get("margin", 0.05) < 0:
        problems.append(f"margin: must be a number >= 0 (got {data.get('margin')!r})")
    ids = []
    for i, sc in enumerate(data.get("scenarios") or []):
        where = f"scenarios.{i}"
        if not isinstance(sc, dict):
            problems.append(f"{where}: expected a mapping (got {sc!r})")
            continue
        problems += [f"{where}.{k}: unknown key; valid: {', '.join(sorted(SCENARIO_KEYS))}"
                     for k in sorted(set(sc) - SCENARIO_KEYS)]
        for key in ("id", "file"):
            if not isinstance(sc.get(key), str):
                problems.append(f"{where}.{key}: required string (got {sc.get(key)!r})")
        if isinstance(sc.get("file"), str) and not (Path(path).parent / sc["file"]).is_file():
            problems.append(f"{where}.file: {sc['file']} not found")
        if not isinstance(sc.get("set", {}), dict):
            problems.append(f"{where}.set: expected a mapping (got {sc.get('set')!r})")
        if not isinstance(sc.get("attacks", []), list):
            problems.append(f"{where}.attacks: expected a list (got {sc.get('attacks')!r})")
        if sc.get("id") in ids:
            problems.append(f"{where}.id: duplicate {sc['id']!r}")
        ids.append(sc.get("id"))
    for i, c in enumerate(data.get("checks") or []):
        where = f"checks.{i}"
        if not isinstance(c, dict):
            problems.append(f"{where}: expected a mapping (got {c!r})")
            continue
        problems += [f"{where}.{k}: unknown key; valid: {', '.join(sorted(CHECK_KEYS))}"
                     for k in sorted(set(c) - CHECK_KEYS)]
        for key in ("scenario", "attack", "metric"):
            if not isinstance(c.get(key), str):
                problems.append(f"{where}.{key}: required string (got {c.get(key)!r})")
        if isinstance(c.get("scenario"), str) and c["scenario"] not in ids:
            problems.append(f"{where}.scenario: unknown scenario {c['scenario']!r}; valid: "
                            f"{', '.join(str(x) for x in ids)}")
        directions = [d for d in ("min", "max") if d in c]
        if len(directions) != 1:
            problems.append(f"{where}: needs exactly one of min / max (got {directions or 'neither'})")
        elif not _number(c[directions[0]]):
            problems.append(f"{where}.{directions[0]}: must be a number (got {c[directions[0]]!r})")
    if problems:
        raise ConfigError(path, problems)


def load_baseline(path=DEFAULT_BASELINE):
    """Read and validate a baseline file."""
    path = Path(path)
    data = read_yaml(path)
    validate_baseline(data, path)
    return data


def evaluate(checks, scores):
    """Compare each check with the scores found.

    ``scores``: scenario id -> list of attack results (dicts with ``attack``,
    ``observer``, ``status``, ``scores``), or a string saying why there are none."""
    out = []
    for c in checks:
        found = scores.get(c["scenario"], "scenario not run")
        if isinstance(found, str):
            out.append(CheckResult(c, reason=found))
            continue
        matching = [r for r in found if r.get("attack") == c["attack"] and r.get("status", "ok") == "ok"
                    and (not c.get("observer") or r.get("observer") == c["observer"])]
        values = [r["scores"][c["metric"]] for r in matching if _number((r.get("scores") or {}).get(c["metric"]))]
        if not values:
            notes = [r.get("note") for r in found if r.get("attack") == c["attack"] and r.get("note")]
            why = (f"no {c['metric']} score from {c['attack']}"
                   + (f" ({notes[0]})" if notes else "" if matching else " (attack did not run)"))
            out.append(CheckResult(c, reason=why))
            continue
        value = max(values)
        res = CheckResult(c, value=value)
        res.passed = value >= c["min"] if "min" in c else value <= c["max"]
        if not res.passed:
            res.reason = (f"below the minimum {c['min']:g}" if "min" in c else f"above the maximum {c['max']:g}")
        out.append(res)
    return out


def updated_checks(results, margin):
    """Checks with ``value`` and the bound reset from this run: min = value - margin,
    max = value + margin (a check's own ``margin`` wins); checks without a value keep theirs."""
    out = []
    for r in results:
        c = dict(r.check)
        if r.value is not None:
            m = c.get("margin", margin)
            c["value"] = round(r.value, 4)
            if r.direction == "min":
                c["min"] = math.floor(round((r.value - m) * 1000, 6)) / 1000
            else:
                c["max"] = math.ceil(round((r.value + m) * 1000, 6)) / 1000
        out.append(c)
    return out


def write_baseline(path, checks):
    """Rewrite the ``checks:`` list of a baseline file; everything above it (comments,
    scenarios, their layout) is kept as written."""
    path = Path(path)
    lines = path.read_text().splitlines(keepends=True)
    cut = next((i for i, line in enumerate(lines) if re.match(r"checks:\s*(#.*)?$", line)), len(lines))
    head = "".join(lines[:cut])
    if head and not head.endswith("\n"):
        head += "\n"
    body = [yaml.safe_dump(c, default_flow_style=True, sort_keys=False, width=400).strip() for c in checks]
    path.write_text(head + "checks:\n" + "".join(f"  - {x}\n" for x in body))


def format_table(results):
    """The printed table: check, value now, value when the bound was set, bound, pass/FAIL."""
    rows = [("check", "value", "was", "bound", "result")]
    for r in results:
        value = "-" if r.value is None else f"{r.value:.4f}"
        was = f"{r.check['value']:.4f}" if _number(r.check.get("value")) else "-"
        op = ">=" if r.direction == "min" else "<="
        rows.append((r.name, value, was, f"{op} {r.bound:g}", "pass" if r.passed else f"FAIL {r.reason}".strip()))
    w = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}  {d:<{w[3]}}  {e}" for a, b, c, d, e in rows)


def run_regress(baseline_path=DEFAULT_BASELINE, overrides=None, only=None, runs_root=None, n_jobs=None,
                on_done=None):
    """Run the baseline's scenarios and evaluate its checks.

    ``overrides``: scenario id -> mapping merged over that scenario's ``set`` (how a test
    weakens a defence); ``only``: scenario ids to run (their checks alone are evaluated).
    Returns (list of CheckResult, list of sweep.Result)."""
    from testbed.run.sweep import Job, run_scenarios, sets_from_dict
    from .scenario import deep_merge

    baseline_path = Path(baseline_path).resolve()
    data = load_baseline(baseline_path)
    overrides = overrides or {}
    scenarios = [s for s in data.get("scenarios") or [] if not only or s["id"] in only]
    unknown = sorted((set(overrides) | set(only or ())) - {s["id"] for s in data.get("scenarios") or []})
    if unknown:
        raise ConfigError("--only/--set", [f"unknown scenario id {u!r}; valid: "
                                           + ", ".join(s["id"] for s in data.get("scenarios") or [])
                                           for u in unknown])
    jobs = []
    for s in scenarios:
        merged = deep_merge(deep_merge(s.get("set") or {}, {"attacks": s.get("attacks") or []}),
                            overrides.get(s["id"], {}))
        jobs.append(Job(str(baseline_path.parent / s["file"]), sets_from_dict(merged), name=s["id"], label=s["id"]))
    runs_root = Path(runs_root or tempfile.mkdtemp(prefix="regress-")).resolve()
    results = run_scenarios(jobs, runs_root, n_jobs, on_done=on_done, cwd=ROOT)
    from testbed.report.load import load_run
    scores = {}
    for r in results:
        if not r.ok:
            scores[r.job.name] = f"scenario failed: exit {r.returncode}: {r.error}"
        else:
            attacks = load_run(r.run_dir).attacks
            scores[r.job.name] = attacks if attacks else "no attack results in the run directory"
    checks = [c for c in data.get("checks") or [] if c["scenario"] in {s["id"] for s in scenarios}]
    return evaluate(checks, scores), results


def _overrides(items):
    """['ID:KEY=VALUE'] -> {ID: {KEY: value}} (dotted keys nest; values parsed as YAML)."""
    from testbed.cli.run import _override
    out = {}
    for item in items or []:
        sid, colon, rest = item.partition(":")
        key, eq, _ = rest.partition("=")
        if not colon or not eq or not key:
            raise ConfigError("--set", [f"{item!r}: expected SCENARIO_ID:KEY=VALUE"])
        out[sid] = deep_merge(out.get(sid, {}), _override([rest]))
    return out


def main(argv=None):
    from testbed.console import EXIT_CODES, Parser
    p = Parser(prog="python -m testbed.regress",
               description="Privacy regression gate: run the small CI scenarios with their attacks and "
                           "compare every score with its committed bound in the baseline file; exit 1 "
                           "with a table of what moved when any check fails.", epilog=EXIT_CODES)
    p.add_argument("--baseline", metavar="FILE", default=str(DEFAULT_BASELINE), help="baseline file (default: privacy-baseline.yaml)")
    p.add_argument("--update", action="store_true", help="rewrite values and bounds from this run (with the margin)")
    p.add_argument("--only", action="append", metavar="ID", help="run only this scenario id (repeatable)")
    p.add_argument("--set", action="append", metavar="ID:KEY=VALUE",
                   help="override a key of one scenario, e.g. 'fedsgd-tiny-noised:defences=[]'")
    p.add_argument("--runs", metavar="DIR", help="keep run directories here (default: a temporary directory, "
                                  "kept only when a check fails)")
    p.add_argument("--jobs", "-j", type=int, metavar="N", help="scenarios run at once (default: min(cores, scenarios))")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from testbed.run.sweep import format_result
    runs_root = Path(args.runs or tempfile.mkdtemp(prefix="regress-"))
    t0 = time.perf_counter()
    try:
        results, runs = run_regress(args.baseline, _overrides(args.set), args.only, runs_root, args.jobs,
                                    on_done=lambda r, d, t: print(format_result(r, d, t), flush=True))
    except TestbedError as exc:
        if not args.runs:
            shutil.rmtree(runs_root, ignore_errors=True)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print()
    print(format_table(results))
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed in {time.perf_counter() - t0:.0f} s")
    if failed:
        print("failed: " + ", ".join(r.name for r in failed))
    if args.update:
        data = load_baseline(args.baseline)
        new = {check_key(c): c for c in updated_checks(results, data.get("margin", 0.05))}
        write_baseline(args.baseline, [new.get(check_key(c), c) for c in data.get("checks") or []])
        print(f"updated {args.baseline}")
        # after an update only a check that still has no value is a failure
        failed = [r for r in results if r.value is None]
    if failed:
        print(f"run directories kept in {runs_root}")
    elif not args.runs:
        shutil.rmtree(runs_root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    from testbed.console import entry
    sys.exit(entry(main))
