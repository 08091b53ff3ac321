"""Command-line plumbing shared by every CLI of the project (``testbed``, ``attacks``,
``testbed.report``, ``testbed.regress``): the exit codes, an argument parser whose errors are
one line, and the handler that turns known errors into one line and an exit code.
"""
import argparse
import logging
import os
import sys

from .errors import TestbedError

EXIT_CODES = """exit codes:
  0    success
  1    a run failed (see the message; the partial run directory is kept)
  2    bad arguments, bad scenario or input file, not a run directory
  3    a protocol broke its contract
  4    a party went over its memory budget
  5    transport error (container mode)
  130  interrupted (Ctrl-C)
  141  output pipe closed early (e.g. piped into head)"""


class HelpFormatter(argparse.HelpFormatter):
    """Wraps a one-paragraph description; keeps multi-line text (the exit-code table, lists) as
    written."""

    def _fill_text(self, text, width, indent):
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``error: <prog>: <message> (see --help)``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def add_common_arguments(parser, sub=False):
    # on a subcommand the default is suppressed, so `-v run` and `run -v` both count
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS if sub else False,
                        help="log progress details (INFO) and show the traceback of an error")


def run_command(args, usage_errors=()):
    """Set up logging and call ``args.func``; known errors become one line and an exit code
    (a TestbedError's own code; 2 for ``usage_errors``; 130 on Ctrl-C; 141 when the reader of
    stdout went away).  With ``args.verbose`` the traceback is printed too.  Shared by every CLI."""
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        try:
            return args.func(args) or 0
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        # the reader (e.g. `| head`) closed the pipe: stop quietly; point stdout at /dev/null so
        # the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except TestbedError as exc:
        _report(exc, verbose)
        run_dir = getattr(exc, "run_dir", None)
        if run_dir:
            print(f"run directory (partial): {run_dir}", file=sys.stderr)
        return exc.exit_code
    except usage_errors as exc:
        _report(exc, verbose)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry(main):
    """Call a CLI's ``main`` as a program: its exit code, and a closed stdout (``| head``) even
    while argparse prints help ends quietly with 141."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _report(exc, verbose):
    if verbose:
        import traceback
        traceback.print_exc()
    print(f"error: {exc}", file=sys.stderr)
