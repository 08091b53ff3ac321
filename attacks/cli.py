"""Command line: ``python -m attacks <command> ...``

  run RUN_DIR [--attack NAME ...] [--observer NAME] [--option KEY=VALUE ...]
              run attacks on a run directory's capture, score them against its truth/,
              print the attack x observer x metric table and write
              RUN_DIR/attacks/<attack>-<observer>.json
  exposure RUN_DIR [--candidates N]
              Secret Sharer exposure of every canary under the models the observers
              hold and under the starting checkpoint; writes RUN_DIR/attacks/exposure.json
  list        the registered attacks: threat model, targeted protocols and options

Without ``--attack`` every registered attack runs (those that do not target the run's
protocol are listed as skipped).  Known errors print one line and exit with the
error's code (2 bad config or arguments).
"""
import argparse
import json

import yaml

from testbed.cli import run_command
from testbed.errors import ConfigError

from .registry import attack_names, get_attack
from .runner import format_table, run_attacks


def _options(pairs):
    """['beam=8', 'steps=[0, 1]'] -> {'beam': 8, 'steps': [0, 1]} (values parsed as YAML)."""
    out = {}
    for item in pairs or []:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError("--option", [f"{item!r}: expected KEY=VALUE"])
        out[key] = yaml.safe_load(raw)
    return out


def main_run(args):
    names = args.attack or attack_names()
    options = _options(args.option)
    if options and len(names) != 1:
        raise ConfigError("--option", ["options need exactly one --attack"])
    specs = [{"name": n, "observer": args.observer, "options": options} for n in names]
    results = run_attacks(args.run_dir, specs)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "reconstructions"} for r in results], indent=2))
    else:
        print(format_table(results))
        for r in results:
            for note in r.get("notes", []):
                print(f"note: {r['attack']} as {r['observer']}: {note}")
            if "path" in r:
                print(f"wrote {r['path']}")
    return 0


def main_exposure(args):
    from .exposure import format_exposure, run_exposure
    out = run_exposure(args.run_dir, candidates=args.candidates)
    print(format_exposure(out))
    print(f"wrote {out['path']}")
    return 0


def main_list(_args):
    for name in attack_names():
        a = get_attack(name)
        tm = a.threat_model
        print(f"{name}\n  threat model: {tm.summary}\n  observers: {', '.join(tm.observers)}; "
              f"knowledge: {', '.join(sorted(tm.knowledge))}\n  targets: "
              + "; ".join(f"{p} ({', '.join(k)})" for p, k in a.targets.items())
              + f"\n  options: {json.dumps(a.options)}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attacks", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run attacks on a run directory")
    p.add_argument("run_dir")
    p.add_argument("--attack", action="append", metavar="NAME",
                   help="attack to run (repeatable; default: all)")
    p.add_argument("--observer",
                   help="observer to play (default: every observer that receives the attack's kinds)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="attack option (repeatable)")
    p.add_argument("--json", action="store_true", help="print the results (without reconstructions) as JSON")
    p.set_defaults(func=main_run)
    p = sub.add_parser("exposure", help="canary exposure under the models the observers hold")
    p.add_argument("run_dir")
    p.add_argument("--candidates", type=int, default=1000, help="random candidates per canary (default 1000)")
    p.set_defaults(func=main_exposure)
    p = sub.add_parser("list", help="list the registered attacks")
    p.set_defaults(func=main_list)
    args = parser.parse_args(argv)
    return run_command(args, usage_errors=(ValueError, FileNotFoundError))
