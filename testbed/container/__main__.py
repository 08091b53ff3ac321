"""``python -m testbed.container credentials|prepare|coordinator|party`` -- a container's entry point.

The command comes from the first argument or the ``ROLE`` environment variable; every
other setting from the environment (:mod:`testbed.container.settings`).  ``SETUP=1``: the
coordinator first does what ``credentials`` and ``prepare`` do (the plain compose.yaml, where
one-shot services would end ``docker compose up --exit-code-from coordinator`` early).  Known errors
print one line and exit with the error's code (2 config, 3 protocol, 4 memory budget,
5 transport); SIGTERM (``docker stop``) ends the run as interrupted, not silently.
"""
import logging
import os
import signal
import sys

COMMANDS = ("credentials", "prepare", "coordinator", "party")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def configure_torch():
    """Torch threads (TESTBED_THREADS, default 1 as in ``python -m testbed``; ``up`` sets the
    container's CPU limit); the CUDA memory cap from the accelerator budget."""
    import torch
    threads = int(os.environ.get("TESTBED_THREADS") or 1)
    if threads > 0:
        torch.set_num_threads(threads)
    fraction = os.environ.get("TESTBED_GPU_MEMORY_FRACTION")
    budget = os.environ.get("TESTBED_GPU_MEMORY_BUDGET")
    if (fraction or budget) and torch.cuda.is_available():
        if not fraction:
            total = torch.cuda.get_device_properties(0).total_memory
            fraction = min(1.0, int(budget) / total)
        torch.cuda.set_per_process_memory_fraction(float(fraction))
        logging.getLogger(__name__).info("CUDA memory capped at %.3f of the device", float(fraction))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else os.environ.get("ROLE", "")
    # before torch is imported, so its thread pool starts at this size
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("TESTBED_THREADS") or "1")
    if command not in COMMANDS:
        print(f"usage: python -m testbed.container {{{'|'.join(COMMANDS)}}} (or ROLE=...; got {command!r})",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s {command} %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    from testbed.errors import TestbedError
    from testbed.scenario import load_scenario

    from .settings import from_env
    try:
        settings = from_env()
        scenario = load_scenario(settings.scenario)
        setup = command == "coordinator" and os.environ.get("SETUP") == "1"
        if command == "credentials" or setup:
            from .credentials import ensure_credentials
            print(ensure_credentials(settings.credentials_dir, scenario.parties.count), flush=True)
            if settings.parts_dir or setup:   # the shared parts volume: parties write there as nobody
                parts = settings.parts_dir or os.path.join(settings.results_dir, ".parts")
                os.makedirs(parts, exist_ok=True)
                os.chmod(parts, 0o1777)
            if command == "credentials":
                return 0
        configure_torch()
        if command == "prepare" or setup:
            from .prepare import prepare
            from .process import drop_privileges
            if command == "prepare":
                drop_privileges()
            info = prepare(scenario, settings.data_dir, settings.base_dir)
            print(f"prepared {info['parties']} party shards of {scenario.name} in {settings.data_dir}", flush=True)
            if command == "prepare":
                return 0
        if command == "coordinator":
            from .coordinator import main as run
        else:
            from .party import main as run
        return run(settings, scenario)
    except TestbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    code = main()
    # the parts are closed; leave now rather than let interpreter shutdown race the transport's
    # daemon threads (a reader still logging at shutdown aborts the process: exit 134)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
