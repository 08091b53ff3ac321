"""``python -m testbed run|validate SCENARIO``: run a scenario, or only check it.

    python -m testbed run scenarios/quickstart.yaml
    python -m testbed run scenarios/pcmoe-tiny.yaml --set training.steps=10 --name try1
    python -m testbed validate scenarios/privatelora.yaml

Both read the file, apply ``--set`` overrides and check everything that can be checked
before torch is imported (schema, names, paths, defence and attack options; see
:mod:`testbed.cli.checks`), so a typo answers in about a second; then the protocols' own
checks (their options, the model family) run.
"""
import json
from pathlib import Path

from testbed.errors import ConfigError
from testbed.scenario import load_scenario


def _override(pairs):
    """['training.steps=10'] -> {'training': {'steps': 10}} (values parsed as YAML);
    ConfigError naming ``--set`` for an item that is not KEY=VALUE.  A number addresses an
    item of a list: ``defences.0.sigma=0.1`` -> {'defences': {'0': {'sigma': 0.1}}}, which
    :func:`testbed.scenario.deep_merge` applies to the scenario's first defence."""
    import yaml
    out, problems = {}, []
    for item in pairs or []:
        key, eq, raw = item.partition("=")
        parts = key.split(".")
        if not eq or not all(parts) or not raw.strip():
            problems.append(f"{item!r}: expected KEY=VALUE with a dotted key and a YAML value, "
                            f"e.g. training.steps=10 (null for none)")
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problems.append(f"{item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})")
            continue
        cur = out
        for n, p in enumerate(parts):
            if isinstance(cur, list) and not (p.isdigit() and int(p) < len(cur)):
                problems.append(f"{item!r}: {parts[n - 1]} is a list of {len(cur)} given with --set; "
                                f"no item {p}")
                break
            if n == len(parts) - 1:
                cur[int(p) if isinstance(cur, list) else p] = value
                break
            cur = _child(cur, p)
            if cur is None:
                problems.append(f"{item!r}: {p} was already given a value")
                break
    if problems:
        raise ConfigError("--set", problems)
    return out


def _child(cur, key):
    """The mapping (or list) under ``key`` of an override being built, made when absent; a
    list given earlier (``defences=[...]``) is entered by item number (``defences.0.sigma``);
    None when ``key`` already holds a value that cannot be entered."""
    nxt = cur[int(key)] if isinstance(cur, list) else cur.setdefault(key, {})
    return nxt if isinstance(nxt, (dict, list)) else None


def load_with_overrides(path, pairs):
    """load_scenario(path) with ``--set`` pairs merged; a problem in an overridden key says so."""
    overrides = _override(pairs)
    try:
        return load_scenario(path, overrides)
    except ConfigError as exc:
        if not overrides:
            raise
        keys = [item.partition("=")[0] for item in pairs]
        problems = [p + (" (given with --set)" if any(p.startswith(k + ":") or p.startswith(k + ".")
                                                      for k in keys) else "") for p in exc.problems]
        raise ConfigError(exc.path, problems) from None


def add_scenario_arguments(p):
    """Arguments every command that runs one scenario takes (run, up)."""
    p.add_argument("scenario", help="scenario YAML file (see scenarios/; python -m testbed validate FILE "
                                    "checks one)")
    p.add_argument("--runs", default="runs", metavar="DIR",
                   help="where run directories go (default: runs/)")
    p.add_argument("--name", help="run directory name (default: <scenario name>-<timestamp>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a scenario key with a YAML value, e.g. --set training.steps=10 or "
                        "--set 'parties.link={up_mbps: 20}' (repeatable)")


def check_runs_dir(runs):
    p = Path(runs)
    if p.exists() and not p.is_dir():
        raise ConfigError("--runs", [f"{runs}: not a directory"])


def add_run_arguments(p):
    add_scenario_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.add_argument("--no-report", action="store_true",
                   help="do not write report/report.html at the end (python -m testbed.report RUN "
                        "writes it later)")
    p.add_argument("--seeds", metavar="LIST",
                   help="run each seed, e.g. 0,1,2 or 0-4 (overrides the scenario's seeds:): one "
                        "child run directory per seed, mean ± 95%% CI in the summary")


def main_run(args):
    from .checks import check_scenario, light_problems
    sc = load_with_overrides(args.scenario, args.set)
    check_runs_dir(args.runs)
    problems = light_problems(sc)
    if problems:
        raise ConfigError(args.scenario, problems)
    check_scenario(sc, args.scenario)          # the protocols' own checks (imports torch)
    from testbed.run.runner import run_scenario
    from testbed.run.summary import format_summary

    seeds = getattr(args, "seeds", None)
    if seeds or sc.seeds:
        from testbed.run.seeds import format_seed_summary, parse_seeds, run_seeds
        seeds = parse_seeds(seeds) if seeds else sc.seeds
        path, summary = run_seeds(sc, seeds, runs_root=args.runs, progress=not args.no_progress,
                                  run_name=args.name)
        if len(seeds) > 1:
            print(json.dumps(summary, indent=2) if args.json else format_seed_summary(summary))
            return 0
    else:
        path, summary = run_scenario(sc, runs_root=args.runs, progress=not args.no_progress,
                                     run_name=args.name)
    summary["leakage"] = leakage(path)
    if not args.no_report:
        report = _write_report(path)
        if report:
            summary["report"] = str(report)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary) + _format_tail(summary))
    return 0


def leakage(run_path):
    """One row per attack x observer that ran: token accuracy (in place), token-set recall
    (for traffic without token positions, e.g. PC-MoE's expert messages) and canary recovery."""
    rows = []
    for f in sorted((Path(run_path) / "attacks").glob("*.json")):
        try:
            r = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(r, dict) and r.get("status") == "ok":
            s = r.get("scores", {})
            rows.append({"attack": r["attack"], "observer": r["observer"], "protocol": r.get("protocol"),
                         **{k: s.get(k) for k in ("token_accuracy", "token_set_recall", "canary_recovery")}})
    return rows


def _format_tail(summary):
    """The report's path, then the leakage table: what each observer could reconstruct."""
    lines = []
    if summary.get("report"):
        lines += ["", f"report: {summary['report']}"]
    rows = summary.get("leakage") or []
    if rows:
        num = lambda v: "-" if v is None else f"{v:.3f}"   # noqa: E731
        lines += ["", "leakage (attack x observer, on the captured traffic): token acc = private tokens "
                      "recovered in place, set recall = share of a batch's distinct tokens recovered, "
                      "canary = planted secrets recovered; - = not measurable from this traffic",
                  f"  {'attack':<20}{'observer':<14}{'protocol':<14}{'token acc':>10}{'set recall':>12}"
                  f"{'canary':>8}"]
        for r in rows:
            lines.append(f"  {r['attack']:<20}{r['observer']:<14}{r['protocol'] or '-':<14}"
                         f"{num(r['token_accuracy']):>10}{num(r['token_set_recall']):>12}"
                         f"{num(r['canary_recovery']):>8}")
    return "\n".join(lines)


def _write_report(path):
    """report/report.html of the finished run; a failure here is a warning, not a failed run."""
    import logging
    try:
        from testbed.report import build_report
        return build_report([path]) / "report.html"
    except Exception as exc:  # the run is complete and on disk; the report can be rebuilt
        logging.getLogger(__name__).warning("report not written (%s); python -m testbed.report %s", exc, path)
        return None


def add_validate_arguments(p):
    p.add_argument("scenario", help="scenario YAML file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="check the scenario with this key overridden, as run --set would (repeatable)")
    p.add_argument("--quick", action="store_true",
                   help="skip the protocols' own checks (they import torch and take seconds)")


def main_validate(args):
    from .checks import check_scenario
    sc = load_with_overrides(args.scenario, args.set)
    check_scenario(sc, args.scenario, deep=not args.quick)
    n = sc.parties.count
    print(f"{args.scenario}: ok ({sc.protocol.name}, {n} part{'y' if n == 1 else 'ies'}, "
          f"{sc.training.steps} steps{', ' + str(len(sc.attacks)) + ' attacks' if sc.attacks else ''}"
          f"{'; protocol checks skipped' if args.quick else ''})")
    return 0
