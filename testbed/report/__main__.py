"""``python -m testbed.report RUN_DIR [RUN_DIR ...] [-o DIR]``: write a report.

Default output: ``RUN_DIR/report/`` for one run, ``reports/<timestamp>/`` for several.
Every path is checked to be a run directory before anything is read or plotted.
"""
import sys

from testbed.console import EXIT_CODES, Parser, add_common_arguments, run_command
from testbed.errors import ConfigError


def _main(args):
    from pathlib import Path

    from testbed.rundir import RUN_MARKERS
    for r in args.runs:
        p = Path(r)
        if not p.is_dir() or not any((p / m).is_file() for m in RUN_MARKERS):
            why = "not a run directory (it does not exist)" if not p.exists() else \
                f"not a run directory (none of {', '.join(RUN_MARKERS)} found)"
            raise ConfigError(p, [why])
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError("-o", [f"{args.out}: not a directory"])
    from .build import build_report
    out = build_report(args.runs, args.out)
    print(f"report: {out / 'report.html'}")
    print(f"        {out / 'report.md'}")
    return 0


def main(argv=None):
    p = Parser(prog="python -m testbed.report", epilog=EXIT_CODES,
               description="Report one or more run directories: a self-contained report.html, "
                           "report.md and PNG plots (learning, cost, traffic, leakage). Reads the "
                           "saved artifacts only; never retrains.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (runs/<scenario>-<timestamp>)")
    p.add_argument("-o", "--out", metavar="DIR", help="output directory (default: RUN_DIR/report for one run, "
                                                      "reports/<timestamp> for several)")
    add_common_arguments(p)
    args = p.parse_args(argv)
    args.func = _main
    return run_command(args)


if __name__ == "__main__":
    from testbed.console import entry
    sys.exit(entry(main))
