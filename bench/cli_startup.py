"""Command start-up: whole-process seconds of the instant commands and of argument errors.

    python bench/cli_startup.py [--repeats 3]

Each command runs as its own process (``python -m ...`` from the repository root), ``--repeats``
times, alternating with the others; the best wall time is printed next to a bare interpreter
(``python -c pass``) measured the same way, and ``import torch`` for scale.  The goal is under
a second on a quiet machine for help, ``validate``, ``attacks list`` and every argument error;
``validate`` of a valid scenario also runs the protocols' own checks, which import torch (its
``--quick`` form does not).  Timing depends on how busy the machine is: print the load average
with the numbers and compare numbers from one run only.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("bare interpreter (python -c pass)", ["-c", "pass"]),
    ("import torch", ["-c", "import torch"]),
    ("testbed --help", ["-m", "testbed", "--help"]),
    ("testbed run --help", ["-m", "testbed", "run", "--help"]),
    ("testbed validate missing.yaml", ["-m", "testbed", "validate", "missing.yaml"]),
    ("testbed run missing.yaml", ["-m", "testbed", "run", "missing.yaml"]),
    ("testbed run quickstart --set training.steps", ["-m", "testbed", "run", "scenarios/quickstart.yaml",
                                                     "--set", "training.steps"]),
    ("testbed bogus-command", ["-m", "testbed", "bogus-command"]),
    ("testbed validate quickstart --quick", ["-m", "testbed", "validate", "scenarios/quickstart.yaml", "--quick"]),
    ("testbed validate quickstart (protocol checks)", ["-m", "testbed", "validate", "scenarios/quickstart.yaml"]),
    ("attacks list", ["-m", "attacks", "list"]),
    ("attacks run missing-dir", ["-m", "attacks", "run", "missing-dir"]),
    ("attacks run scenarios/ (not a run)", ["-m", "attacks", "run", "scenarios"]),
    ("testbed.report missing-dir", ["-m", "testbed.report", "missing-dir"]),
    ("testbed memory --model bogus", ["-m", "testbed", "memory", "--model", "bogus"]),
    ("testbed throughput --device bogus", ["-m", "testbed", "throughput", "--device", "bogus"]),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs per command; the best is printed")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    best = {name: float("inf") for name, _ in CASES}
    codes = {}
    for _ in range(args.repeats):
        for name, argv in CASES:
            t = time.perf_counter()
            r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True)
            best[name] = min(best[name], time.perf_counter() - t)
            codes[name] = r.returncode
    bare = best[CASES[0][0]]
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} cores, "
          f"best of {args.repeats}")
    print(f"{'command':<48}{'exit':>5}{'seconds':>9}{'x bare':>8}")
    for name, _ in CASES:
        print(f"{name:<48}{codes[name]:>5}{best[name]:>9.2f}{best[name] / bare:>8.1f}")


if __name__ == "__main__":
    main()
