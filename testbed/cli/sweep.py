"""``python -m testbed sweep SCENARIO [SCENARIO ...]``: run several scenarios, report them together.

Each scenario runs in its own process (``python -m testbed run SCENARIO --json
--no-progress``), so a crash or a bad file fails that scenario alone; up to ``--jobs``
run at once (default: min(CPU cores, number of scenarios)).  A line is printed as each
one finishes, then one report over every run directory that was written (failed runs
included: the report shows what they wrote before failing).

    python -m testbed sweep scenarios/fedsgd-tiny.yaml scenarios/split-tiny.yaml --jobs 2
    python -m testbed sweep scenarios/*-tiny.yaml --set training.steps=4 -o reports/tiny
    python -m testbed sweep scenarios/fedavg-4party.yaml scenarios/split-4party.yaml --seeds 0,1,2

Exit code: 0 when every scenario ran, 1 when any failed.  The machinery is
:mod:`testbed.run.sweep` (the privacy regression gate uses it too).
"""
import datetime as dt
from pathlib import Path

import yaml

from testbed.run.sweep import Job, default_jobs, format_result, run_scenarios


def _names(paths, stamp):
    """Run directory names: <scenario name>-<stamp>, numbered when a name repeats."""
    names = []
    for p in paths:
        try:
            base = (yaml.safe_load(Path(p).read_text()) or {}).get("name") or Path(p).stem
        except (OSError, yaml.YAMLError, AttributeError):
            base = Path(p).stem
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
    jobs = [Job(s, list(args.set or []), name, seeds=args.seeds)
            for s, name in zip(args.scenarios, _names(args.scenarios, stamp))]
    n = args.jobs or default_jobs(len(jobs))
    print(f"sweep: {len(jobs)} scenario(s), {n} at a time, runs in {args.runs}/", flush=True)
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
