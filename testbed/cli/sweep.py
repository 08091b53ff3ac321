"""``python -m testbed sweep SCENARIO [SCENARIO ...]``: run several scenarios, report them together.

Each scenario runs in its own process (``python -m testbed run SCENARIO --json
--no-progress``), so a crash or a bad file fails that scenario alone; up to ``--jobs``
run at once (default: min(CPU cores, number of scenarios)).  A line is printed as each
one finishes, then one report over every run directory that was written (failed runs
included: the report shows what they wrote before failing).

    python -m testbed sweep scenarios/fedsgd-tiny.yaml scenarios/split-tiny.yaml --jobs 2
    python -m testbed sweep scenarios/*-tiny.yaml --set training.steps=4 -o reports/tiny
    python -m testbed sweep scenarios/fedavg-4party.yaml scenarios/split-4party.yaml --seeds 0,1,2
    python -m testbed sweep scenarios/fedsgd-tiny.yaml --set 'defences=[{type: noise, kinds: [grad]}]' \
        --grid defences.0.sigma=0,0.01,0.1

``--grid KEY=V1,V2,...`` runs every scenario once per value (several ``--grid``: the
cartesian product; see :mod:`testbed.run.grid`), in run directories named
``<scenario>-<key><value>-<stamp>``; every point is checked before anything runs, and the
report gains the privacy-utility frontier (:mod:`testbed.report.frontier`).

Exit code: 0 when every scenario ran, 1 when any failed.  The machinery is
:mod:`testbed.run.sweep` (the privacy regression gate uses it too).
"""
import datetime as dt
from pathlib import Path

import yaml

from testbed.run.sweep import Job, default_jobs, format_result, run_scenarios


def _names(paths, stamp, suffixes=None):
    """Run directory names: <scenario name>[-<grid suffix>]-<stamp>, numbered when a name repeats."""
    names = []
    for p, suffix in zip(paths, suffixes or [""] * len(paths)):
        try:
            base = (yaml.safe_load(Path(p).read_text()) or {}).get("name") or Path(p).stem
        except (OSError, yaml.YAMLError, AttributeError):
            base = Path(p).stem
        base += f"-{suffix}" if suffix else ""
        name, i = f"{base}-{stamp}", 1
        while name in names:
            name, i = f"{base}-{stamp}-{i}", i + 1
        names.append(name)
    return names


def add_sweep_arguments(p):
    p.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="scenario YAML files")
    p.add_argument("--runs", default="runs", metavar="DIR", help="where run directories go (default: runs/)")
    p.add_argument("--jobs", "-j", type=int, metavar="N", help="scenarios run at once (default: min(cores, scenarios))")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a key in every scenario, e.g. --set training.steps=10 (repeatable)")
    p.add_argument("-o", "--out", metavar="DIR", help="report directory (default: reports/<timestamp>, or "
                                       "RUN/report for a single scenario)")
    p.add_argument("--no-report", action="store_true", help="run only, write no report")
    p.add_argument("--seeds", metavar="LIST",
                   help="run every scenario over these seeds, e.g. 0,1,2 (mean ± 95%% CI per protocol)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="seconds before a scenario is stopped and failed")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2,...",
                   help="run every scenario once per value of KEY, e.g. --grid defences.0.sigma=0,0.01,0.1 "
                        "(repeatable: the cartesian product); the report adds the privacy-utility frontier")


def _check_grid(scenarios, sets, points):
    """Every grid point of every scenario loaded and checked before anything runs: a bad
    grid key or value is one ConfigError naming ``--grid``, not one failed run per point."""
    from testbed.errors import ConfigError
    from testbed.run.grid import grid_problems

    from .checks import light_problems, protocol_problems
    from .run import load_with_overrides

    def load(scenario, extra, deep):
        sc = load_with_overrides(scenario, sets + extra)
        return light_problems(sc) or (protocol_problems(sc) if deep else [])

    # the protocol's own checks (they import torch) only when a grid key is the protocol's
    deep = any(k.startswith("protocol.") for _, _, settings in points for k in settings)
    problems = []
    for s in scenarios:
        problems += [p for p in grid_problems([(extra, st) for _, extra, st in points],
                                              lambda extra, s=s: load(s, extra, deep)) if p not in problems]
    if problems:
        raise ConfigError("--grid", problems)


def main_sweep(args):
    from testbed.errors import ConfigError

    from .run import _override, check_runs_dir
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("--jobs", [f"must be >= 1 (got {args.jobs})"])
    check_runs_dir(args.runs)
    _override(args.set)    # a malformed --set is everyone's problem; a bad scenario fails alone
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.seeds:
        from testbed.run.seeds import parse_seeds
        parse_seeds(args.seeds)          # a bad list fails here, not once per scenario
    from testbed.run.grid import expand, parse_grid
    points = expand(parse_grid(args.grid))
    if args.grid:
        _check_grid(args.scenarios, args.set or [], points)
    todo = [(s, point) for s in args.scenarios for point in points]
    names = _names([s for s, _ in todo], stamp, [suffix for _, (suffix, _, _) in todo])
    jobs = [Job(s, list(args.set or []) + sets, name, seeds=args.seeds,
                label=" ".join([Path(s).name] + sets))
            for (s, (_, sets, _)), name in zip(todo, names)]
    n = args.jobs or default_jobs(len(jobs))
    print(f"sweep: {len(jobs)} run(s), {n} at a time, runs in {args.runs}/", flush=True)
    results = run_scenarios(jobs, args.runs, n, timeout=args.timeout,
                            on_done=lambda r, d, t: print(format_result(r, d, t), flush=True))
    failed = [r for r in results if not r.ok]
    dirs = [r.run_dir for r in results if r.run_dir is not None and r.run_dir.is_dir()]
    if dirs and not args.no_report:
        from testbed.report import build_report
        out = build_report(dirs, args.out)
        print(f"report: {out / 'report.html'}")
    print(f"sweep: {len(results) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0
