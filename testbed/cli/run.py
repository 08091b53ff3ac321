"""``python -m testbed run|validate SCENARIO``."""
import json

from testbed.scenario import load_scenario


def _override(pairs):
    """['training.steps=10'] -> {'training': {'steps': 10}} (values parsed as YAML)."""
    import yaml
    out = {}
    for item in pairs or []:
        key, _, raw = item.partition("=")
        cur = out
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = yaml.safe_load(raw)
    return out


def add_scenario_arguments(p):
    """Arguments every command that runs one scenario takes (run, up)."""
    p.add_argument("scenario", help="scenario YAML file")
    p.add_argument("--runs", default="runs", help="where run directories go (default: runs/)")
    p.add_argument("--name", help="run directory name (default: <scenario>-<timestamp>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a scenario key, e.g. --set training.steps=10 (repeatable)")


def add_run_arguments(p):
    add_scenario_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--seeds", metavar="LIST",
                   help="run each seed, e.g. 0,1,2 or 0-4 (overrides the scenario's seeds:): one "
                        "child run directory per seed, mean ± 95%% CI in the summary")


def main_run(args):
    from testbed.run.runner import run_scenario
    from testbed.run.summary import format_summary

    sc = load_scenario(args.scenario, _override(args.set))
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
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def add_validate_arguments(p):
    p.add_argument("scenario", help="scenario YAML file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")


def main_validate(args):
    sc = load_scenario(args.scenario, _override(args.set))
    print(f"{args.scenario}: ok ({sc.protocol.name}, {sc.parties.count} parties, "
          f"{sc.training.steps} steps)")
    return 0
