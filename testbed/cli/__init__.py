"""Command line: ``python -m testbed <command> ...``

  run SCENARIO        run a scenario in the embedded engine, print the summary
  validate SCENARIO   check a scenario file, listing every problem
  memory              project per-party training memory for real model shapes (meta device)
  throughput          PrivateLoRA serving throughput model for real shapes and networks
  steptime            PC-MoE training step time over real networks vs centralized, FedAvg, split
  up SCENARIO         run a scenario under Docker Compose
  sweep SCENARIO...   run several scenarios and report them together

Known errors print one line (or one block) and exit with the error's code:
2 bad config, 3 protocol error, 4 memory budget exceeded, 5 transport error.
"""
import argparse
import importlib
import logging
import os
import sys

from testbed.errors import TestbedError

# subcommand -> module that defines add_arguments(parser) and main(args)
COMMANDS = {
    "run": ("testbed.cli.run", "run a scenario in the embedded engine"),
    "validate": ("testbed.cli.run", "validate a scenario file"),
    "memory": ("testbed.cli.memory", "project training memory per party for real model shapes"),
    "throughput": ("testbed.cli.throughput", "PrivateLoRA throughput model"),
    "steptime": ("testbed.cli.steptime", "PC-MoE training step time over a network vs the baselines"),
    "up": ("testbed.cli.up", "run a scenario under Docker Compose"),
    "sweep": ("testbed.cli.sweep", "run several scenarios and report them together"),
}


def main(argv=None):
    # before any command module imports torch, so its thread pool starts at this size
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("TESTBED_THREADS", "1"))
    parser = argparse.ArgumentParser(prog="python -m testbed", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("TESTBED_THREADS", "1")),
                        help="torch intra-op threads (default 1, or $TESTBED_THREADS): the small "
                             "models of the testbed's scenarios run fastest single-threaded, and "
                             "parallel sweeps must not oversubscribe the cores")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (modname, help_) in COMMANDS.items():
        if importlib.util.find_spec(modname) is None:
            continue
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:  # only the chosen command's module is imported: fast start-up
            mod = importlib.import_module(modname)
            getattr(mod, f"add_{name}_arguments", getattr(mod, "add_arguments", lambda p: None))(p)
            p.set_defaults(func=getattr(mod, f"main_{name}", getattr(mod, "main", None)))
    args = parser.parse_args(argv)
    if args.threads > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(args.threads)
    return run_command(args)


def run_command(args, usage_errors=()):
    """Set up logging and call ``args.func``; known errors become one line and an exit code
    (a TestbedError's own code; 2 for ``usage_errors``; 130 on Ctrl-C).  Shared by every CLI."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except TestbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        run_dir = getattr(exc, "run_dir", None)
        if run_dir:
            print(f"run directory (partial): {run_dir}", file=sys.stderr)
        return exc.exit_code
    except usage_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
