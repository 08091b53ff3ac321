"""Container runs under ``python -m testbed up`` that lose nothing and leak no key.

* a finished run: no certificate key in ``docker inspect`` of any container nor in any file
  under the runs directory; every container (the coordinator and ``prepare`` included) has
  memory, CPU and pids limits; parties wrote their parts as an unprivileged user;
* a party killed mid-run (``docker kill``): the run ends ``failed`` naming it, and every
  metric line each party wrote is in the run directory, the parts kept;
* the coordinator killed mid-run: ``up`` merges the parts itself and names the coordinator.

Needs a Docker daemon and the project image (``TESTBED_IMAGE``; built with build-image.sh).
Without a daemon these tests are skipped, except under ``CI=true``.
"""
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def _up(image, runs, name, *extra):
    return subprocess.Popen([sys.executable, "-m", "testbed", "up", "scenarios/pcmoe-tiny.yaml", "--runs", str(runs),
                             "--name", name, "--no-build", "--image", image, *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _train(records, party):
    return [(r["protocol"], r["step"]) for r in records if r.get("event") == "train" and r.get("party") == party]


def test_keys_are_in_no_inspect_output_and_no_run_file_and_every_container_is_limited(image, tmp_path):
    name = "sec"
    proc = _up(image, tmp_path / "runs", name, "--keep", "--set", "training.steps=2")
    out = proc.communicate(timeout=1500)[0]
    project = f"testbed-{name}"
    credentials = Path(re.search(r"credentials in (\S+)\)", out).group(1))
    try:
        assert proc.returncode == 0, out[-4000:]
        ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"],
                             capture_output=True, text=True).stdout.split()
        inspect = json.loads(subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True).stdout)
        assert {c["Config"]["Labels"]["com.docker.compose.service"] for c in inspect} == {
            "prepare", "coordinator", "party-0", "party-1"}
        text = json.dumps(inspect)
        keys = sorted(credentials.glob("*.key"))
        assert len(keys) == 3
        bodies = [line for k in keys for line in k.read_text().splitlines() if "-----" not in line]
        assert bodies and not [b for b in bodies if b in text] and "PRIVATE KEY" not in text
        for c in inspect:
            host = c["HostConfig"]
            assert host["Memory"] > 0 and host["NanoCpus"] > 0 and host["PidsLimit"] == 512, c["Name"]
            assert not any(e.startswith(("RUN_SECRET=", "CREDENTIALS=")) for e in c["Config"]["Env"])
        run_files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
        leaked = [p for p in run_files if any(b.encode() in p.read_bytes() for b in bodies)
                  or b"PRIVATE KEY" in p.read_bytes()]
        assert run_files and not leaked, leaked
        for p in ("party-0", "party-1"):   # parties ran unprivileged, without NET_ADMIN, host unreachable
            logs = subprocess.run(["docker", "logs", f"{project}-{p}-1"], capture_output=True, text=True).stdout
            assert "uid 65534, capabilities 0x0" in logs and "routes only to" in logs, logs
    finally:
        subprocess.run(["docker", "compose", "-p", project, "-f",
                        str(tmp_path / "runs" / ".work" / name / "compose.rendered.yaml"), "down", "-v", "-t", "2"],
                       capture_output=True)
        shutil.rmtree(credentials, ignore_errors=True)


def _merged_every_line(run, parts):
    """Each party's train lines in the run directory are exactly those of its part (3 steps at least
    were taken before the kill; a step belongs to one party)."""
    metrics, total = _lines(run / "metrics.jsonl"), 0
    for p in ("party-0", "party-1"):
        part = _train(_lines(parts / p / "metrics.jsonl"), p)
        assert part and _train(metrics, p) == part
        total += len(part)
    assert total >= 3


def _kill_mid_run(image, tmp_path, name, victim):
    proc = _up(image, tmp_path / "runs", name, "--set", "training.steps=400", "--set", "training.eval_every=400")
    out, deadline = [], time.monotonic() + 1200
    for line in proc.stdout:
        out.append(line)
        if re.search(r"party-1 step ([3-9]|\d\d+)/", line):   # steps go to one party at a time
            subprocess.run(["docker", "kill", f"testbed-{name}-{victim}-1"], capture_output=True, check=True)
            break
        assert time.monotonic() < deadline, "".join(out)
    out += proc.stdout.readlines()
    proc.wait(timeout=600)
    assert any(re.search(r"party-1 step ([3-9]|\d\d+)/", line) for line in out), "".join(out)
    return proc.returncode, "".join(out), tmp_path / "runs" / name, tmp_path / "runs" / ".work" / name / "parts"


def test_a_killed_party_fails_the_run_naming_it_and_no_line_is_lost(image, tmp_path):
    code, out, run, parts = _kill_mid_run(image, tmp_path, "kp", "party-1")
    assert code != 0, out[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["end"], manifest
    assert "party-1" in manifest["error"] and "party-0" not in manifest["error"].split("--")[0], manifest["error"]
    _merged_every_line(run, parts)


def test_a_killed_coordinator_is_named_and_its_run_merged_by_up(image, tmp_path):
    code, out, run, parts = _kill_mid_run(image, tmp_path, "kc", "coordinator")
    assert code != 0, out[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"].startswith("coordinator: container killed"), manifest
    _merged_every_line(run, parts)
