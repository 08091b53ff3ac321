"""``python -m testbed <command> ...``: the testbed's commands, one module per command.

Start-up stays fast: only the chosen command's module is imported, and each command checks
its arguments and files before it imports torch.  The parser and error handling shared with
the other CLIs are in :mod:`testbed.console` (re-exported here).
"""
import importlib
import os
import sys

from testbed.console import EXIT_CODES, Parser, add_common_arguments, entry, run_command  # noqa: F401

DESCRIPTION = "Run and inspect privacy-preserving collaborative training of LLMs."

# subcommand -> (module that defines add_<name>_arguments(parser) and main_<name>(args), summary)
COMMANDS = {
    "run": ("testbed.cli.run", "run a scenario in the embedded engine and print its summary "
                               "(its attacks and report too)"),
    "validate": ("testbed.cli.run", "check a scenario file (schema, names, paths, protocol, defence and "
                                    "attack options) and list every problem"),
    "memory": ("testbed.cli.memory", "project training memory per PC-MoE party vs centralized for real "
                                     "model shapes (meta device, nothing downloaded)"),
    "throughput": ("testbed.cli.throughput", "model PrivateLoRA serving throughput for real shapes, "
                                             "devices and links"),
    "steptime": ("testbed.cli.steptime", "model PC-MoE's training step time over a network next to "
                                         "centralized, FedAvg and split learning"),
    "up": ("testbed.cli.up", "run a scenario under Docker Compose, one container per party"),
    "sweep": ("testbed.cli.sweep", "run several scenarios side by side and report them together"),
}

def build_parser(chosen=None):
    """The parser, with the arguments of command ``chosen`` only (its module is imported)."""
    parser = Parser(prog="python -m testbed", description=DESCRIPTION, epilog=EXIT_CODES)
    add_common_arguments(parser)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("TESTBED_THREADS", "1")),
                        metavar="N",
                        help="torch intra-op threads (default 1, or $TESTBED_THREADS): the small "
                             "models of the testbed's scenarios run fastest single-threaded, and "
                             "parallel sweeps must not oversubscribe the cores")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands (python -m testbed COMMAND --help for its options)")
    for name, (modname, help_) in COMMANDS.items():
        if importlib.util.find_spec(modname) is None:
            continue
        p = sub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".",
                           epilog=EXIT_CODES)
        add_common_arguments(p, sub=True)
        if name == chosen:  # only the chosen command's module is imported: fast start-up
            mod = importlib.import_module(modname)
            getattr(mod, f"add_{name}_arguments", getattr(mod, "add_arguments", lambda p: None))(p)
            p.set_defaults(func=getattr(mod, f"main_{name}", getattr(mod, "main", None)))
    return parser


def _early_threads(argv):
    """The value of ``--threads N`` / ``--threads=N`` in ``argv`` if it is a positive integer
    (anything else is left to the parser to reject)."""
    for i, a in enumerate(argv):
        value = argv[i + 1] if a == "--threads" and i + 1 < len(argv) else \
            a.split("=", 1)[1] if a.startswith("--threads=") else None
        if value is not None and value.isdigit() and int(value) >= 1:
            return value
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # before any command module imports torch, so its thread pool starts at this size: torch
    # reads OMP_NUM_THREADS once, when it is imported (a later set_num_threads cannot undo a
    # pool of 1 made at import)
    threads = _early_threads(argv)
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = os.environ["TESTBED_THREADS"] = threads
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("TESTBED_THREADS", "1"))
    parser = build_parser(next((a for a in argv if a in COMMANDS), None))
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads: must be >= 1 (got {args.threads})")
    os.environ["TESTBED_THREADS"] = str(args.threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(args.threads)
    return run_command(args)
