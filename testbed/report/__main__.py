"""``python -m testbed.report RUN_DIR [RUN_DIR ...] [-o DIR]``: write a report.

Default output: ``RUN_DIR/report/`` for one run, ``reports/<timestamp>/`` for several.
Exit codes: 0 written, 2 a path is not a run directory.
"""
import argparse
import logging
import sys

from testbed.errors import TestbedError

from .build import build_report


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m testbed.report",
                                description="Report one or more run directories (HTML, Markdown, PNG).")
    p.add_argument("runs", nargs="+", help="run directories (runs/<scenario>-<timestamp>)")
    p.add_argument("-o", "--out", help="output directory (default: RUN/report for one run, "
                                       "reports/<timestamp> for several)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        out = build_report(args.runs, args.out)
    except TestbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"report: {out / 'report.html'}")
    print(f"        {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
