"""``python -m attacks list|run``: the registered attacks, and attacks on a run's capture.

    python -m attacks list
    python -m attacks run runs/<id>                                  # every attack that applies
    python -m attacks run runs/<id> --attack dager --observer coordinator --option beam=8
    python -m attacks exposure runs/<id>                             # canary exposure

Arguments, the run directory, attack names, observers and option keys are checked against
:mod:`attacks.catalog` before torch is imported, so a mistake answers at once.
"""
import json
import sys

from testbed.console import EXIT_CODES, Parser, add_common_arguments, run_command
from testbed.errors import ConfigError

DESCRIPTION = ("Reconstruction attacks on the traffic a run captured, scored against the run's "
               "private data (truth/).")


def _options(pairs):
    """['beam=8', 'steps=[0, 1]'] -> {'beam': 8, 'steps': [0, 1]} (values parsed as YAML)."""
    import yaml
    out = {}
    for item in pairs or []:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError("--option", [f"{item!r}: expected KEY=VALUE"])
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError("--option", [f"{item!r}: the value is not valid YAML"]) from None
    return out


def _precheck(args, names, options):
    """Everything checkable without torch: the run directory, names, observer, options."""
    import yaml

    from testbed.rundir import check_run_dir

    from .catalog import describe
    from .runner import captured_roles
    from .view import WIRE

    run = check_run_dir(args.run_dir)
    try:
        protocol = yaml.safe_load((run / "scenario.yaml").read_text())["protocol"]["name"]
    except (yaml.YAMLError, TypeError, KeyError):
        raise ConfigError(run / "scenario.yaml", ["unreadable (no protocol.name)"]) from None
    for name in names:
        try:
            attack = describe(name)
        except ValueError as exc:
            raise ConfigError("--attack", [str(exc)]) from None
        if options:
            attack.resolve_options(options, where="--option")
    if args.observer and args.observer != WIRE:
        roles = captured_roles(run, protocol)
        if args.observer not in roles:
            raise ConfigError("--observer", [f"{args.observer!r} saw nothing in this {protocol} run; "
                                             f"valid: {', '.join([WIRE] + sorted(roles))}"])


def main_run(args):
    from .catalog import load_catalog
    names = args.attack or list(load_catalog())
    options = _options(args.option)
    if options and len(names) != 1:
        raise ConfigError("--option", ["options need exactly one --attack"])
    _precheck(args, names, options)
    from .runner import format_table, run_attacks
    specs = [{"name": n, "observer": args.observer, "options": options} for n in names]
    results = run_attacks(args.run_dir, specs, progress=lambda line: print(line, file=sys.stderr, flush=True))
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


def main_list(args):
    from .catalog import load_catalog
    cat = load_catalog()
    if args.json:
        print(json.dumps(cat, indent=2))
        return 0
    for name, a in cat.items():
        tm = a["threat_model"]
        print(f"{name}\n  threat model: {tm['summary']}\n  observers: {', '.join(tm['observers'])}; "
              f"knowledge: {', '.join(tm['knowledge'])}\n  targets: "
              + "; ".join(f"{p} ({', '.join(k)})" for p, k in a["targets"].items())
              + f"\n  options: {json.dumps(a['options'])}")
    return 0


def _option_help():
    from .catalog import load_catalog
    return "\n".join(f"  {name}: " + (", ".join(f"{k}={json.dumps(v)}" for k, v in a["options"].items()) or "(none)")
                     for name, a in load_catalog().items())


def build_parser():
    from .catalog import load_catalog
    names = ", ".join(load_catalog())
    parser = Parser(prog="python -m attacks", description=DESCRIPTION, epilog=EXIT_CODES)
    add_common_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands (python -m attacks COMMAND --help for its options)")
    p = sub.add_parser("run", help="run attacks on a run directory's capture and score them",
                       description="Run attacks on a run directory's capture, score them against its truth/, "
                                   "print the attack x observer x metric table and write "
                                   "RUN_DIR/attacks/<attack>-<observer>.json.  Without --attack every "
                                   "registered attack runs; those that do not target the run's protocol "
                                   "are listed as skipped.",
                       epilog="attack options (KEY=default):\n" + _option_help() + "\n\n" + EXIT_CODES)
    add_common_arguments(p, sub=True)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (runs/<scenario>-<timestamp>)")
    p.add_argument("--attack", action="append", metavar="NAME",
                   help=f"attack to run (repeatable; default: all). Valid: {names}")
    p.add_argument("--observer", metavar="ROLE",
                   help="observer to play: wire, coordinator, server, cloud, fedserver or party-N, as "
                        "captured in the run (default: every observer that receives the attack's kinds)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="attack option, value as YAML (repeatable; needs exactly one --attack; "
                        "keys per attack below)")
    p.add_argument("--json", action="store_true", help="print the results (without reconstructions) as JSON")
    p.set_defaults(func=main_run)
    p = sub.add_parser("exposure", help="Secret Sharer exposure of every canary under the models observers hold",
                       description="Exposure (Carlini et al., USENIX Security 2019) of every planted canary "
                                   "under the models the observers end up holding and under the starting "
                                   "checkpoint; writes RUN_DIR/attacks/exposure.json.", epilog=EXIT_CODES)
    p.add_argument("run_dir", help="a run directory")
    p.add_argument("--candidates", type=int, default=1000, help="random candidates per canary (default 1000)")
    p.set_defaults(func=main_exposure)
    p = sub.add_parser("list", help="list the registered attacks: threat model, targets and options",
                       description="List the registered attacks: the observers each may play, the public "
                                   "knowledge it uses, the protocols and message kinds it targets, and "
                                   "its options with their defaults.", epilog=EXIT_CODES)
    add_common_arguments(p, sub=True)
    p.add_argument("--json", action="store_true", help="print the catalog as JSON")
    p.set_defaults(func=main_list)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_command(args, usage_errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
