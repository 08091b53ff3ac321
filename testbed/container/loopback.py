"""Run a container-mode scenario as local processes on loopback -- no Docker.

    python -m testbed.container.loopback scenarios/pcmoe-tiny.yaml --runs /tmp/runs

The same entry points the containers run (``prepare``, ``coordinator``, one ``party``
per index) as subprocesses of this one, talking real TCP over 127.0.0.1 with the
transport's emulated latency and no ``tc`` (``SHAPING=off``).  For tests and for
debugging the container engine without building an image.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .coordinator import parties_needed
from .credentials import ensure_credentials

PORT_LINE = re.compile(r"register on port (\d+)")


class Loopback:
    """A coordinator and its parties as subprocesses. ``env``: extra variables for every
    process; ``party_env``: index -> extra variables of that party."""

    def __init__(self, scenario, scenario_file, data_dir, runs_dir, run_name, env=None, party_env=None):
        self.scenario, self.n = scenario, parties_needed(scenario)
        self.run_dir = Path(runs_dir) / run_name
        # the run's keys live outside the runs directory, and only as long as the run
        self.credentials = tempfile.mkdtemp(prefix="testbed-credentials-")
        ensure_credentials(self.credentials, scenario.parties.count)
        self.env = {**os.environ, "SCENARIO": str(scenario_file), "DATA_DIR": str(data_dir),
                    "RESULTS_DIR": str(runs_dir), "RUN_NAME": run_name, "CREDENTIALS_DIR": self.credentials,
                    "SHAPING": "off", "PORT": "0", "PYTHONUNBUFFERED": "1", "REGISTER_TIMEOUT": "120",
                    **(env or {})}
        self.party_env = party_env or {}
        self.procs, self.output = {}, {}

    def _spawn(self, name, command, env):
        proc = subprocess.Popen([sys.executable, "-m", "testbed.container", command], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.procs[name], self.output[name] = proc, []

        def pump():
            for line in proc.stdout:
                self.output[name].append(line)
        threading.Thread(target=pump, daemon=True).start()
        return proc

    def start_coordinator(self, timeout=180):
        """Start the coordinator; returns the port it listens on."""
        self._spawn("coordinator", "coordinator", self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.output["coordinator"]):
                m = PORT_LINE.search(line)
                if m:
                    self.port = int(m.group(1))
                    return self.port
            if self.procs["coordinator"].poll() is not None:
                raise RuntimeError("coordinator exited early:\n" + self.text("coordinator"))
            time.sleep(0.1)
        raise TimeoutError(f"coordinator did not listen within {timeout}s:\n" + self.text("coordinator"))

    def start_parties(self):
        for i in range(self.n):
            env = {**self.env, "COORDINATOR": f"127.0.0.1:{self.port}", "PARTY": str(i),
                   **self.party_env.get(i, {})}
            self._spawn(f"party-{i}", "party", env)

    def wait(self, timeout=900):
        """Wait for every process; returns {name: exit code}."""
        deadline = time.monotonic() + timeout
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise TimeoutError(f"{name} still running after {timeout}s:\n" + self.text(name)) from None
        time.sleep(0.2)   # let the pump threads drain the pipes
        return codes

    def recover(self, error):
        """What ``up`` does when the coordinator died: merge the parts into the run directory
        and mark it failed with ``error``; returns the manifest."""
        from .merge import recover_run
        return recover_run(self.run_dir, self.parts, self.scenario, error)

    @property
    def parts(self):
        return Path(self.env["RESULTS_DIR"]) / ".parts" / self.run_dir.name

    def kill(self):
        """Kill what still runs and remove the run's credentials."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(self.credentials, ignore_errors=True)

    def text(self, name):
        return "".join(self.output.get(name, []))


def main(argv=None):
    from testbed.scenario import load_scenario

    from .prepare import prepare
    p = argparse.ArgumentParser(prog="python -m testbed.container.loopback",
                                description=__doc__.split("\n")[0])
    p.add_argument("scenario")
    p.add_argument("--runs", default="runs")
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    sc = load_scenario(args.scenario)
    name = args.name or f"{sc.name}-loopback-{time.strftime('%Y%m%d-%H%M%S')}"
    data = Path(args.runs) / ".work" / name / "data"
    prepare(sc, data)
    lb = Loopback(sc, Path(args.scenario).resolve(), data.resolve(), Path(args.runs).resolve(), name)
    lb.start_coordinator()
    lb.start_parties()
    try:
        codes = lb.wait()
    finally:
        lb.kill()
    print(lb.text("coordinator"))
    return codes["coordinator"]


if __name__ == "__main__":
    sys.exit(main())
