"""A plain ``python -m pytest`` never drives the host's Docker daemon nor installs packages.

A fake ``docker`` (answering ``docker info`` like a reachable daemon), ``sudo``, ``apt-get`` and
``debootstrap`` on PATH record every call.  The test files that run Docker commands are run in a
subprocess without ``CI``/``TESTBED_DOCKER_TESTS``: nothing is recorded and the Docker tests are
skipped with the opt-in reason.  With ``TESTBED_DOCKER_TESTS=1`` the same fake is called (so the
recording does see the tests' commands), and only the fake, which has no Compose, is reached.
"""
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKE = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
case "$(basename "$0") $1" in
  "docker info") echo 27.0.0; exit 0 ;;
esac
exit 1
"""


def _docker_test_files():
    """Test files that start a docker command (the ones a plain run must leave alone)."""
    pat = re.compile(r'\["docker"|_docker\(|build-image\.sh|"testbed", "up"')
    return sorted(p.name for p in (ROOT / "tests").glob("test_*.py")
                  if p.name != Path(__file__).name and pat.search(p.read_text()))


def _pytest_with_fakes(tmp_path, **env_extra):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("docker", "sudo", "apt-get", "debootstrap"):
        exe = bin_dir / tool
        exe.write_text(FAKE.format(log=log))
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TESTBED_DOCKER_TESTS", "TESTBED_IMAGE")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHONPATH=str(ROOT), **env_extra)
    files = [f"tests/{f}" for f in _docker_test_files()]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    calls = log.read_text().splitlines() if log.exists() else []
    return r, calls


def test_the_docker_test_files_are_found():
    assert {"test_compose.py", "test_compose_baselines.py", "test_container_image.py"} <= set(_docker_test_files())


def test_plain_pytest_runs_no_docker_command_even_with_a_reachable_daemon(tmp_path):
    r, calls = _pytest_with_fakes(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert calls == []
    assert "Docker tests run only with CI=true or TESTBED_DOCKER_TESTS=1" in r.stdout
    assert re.search(r"\d+ passed, \d+ skipped", r.stdout), r.stdout[-2000:]


def test_opt_in_reaches_docker_and_never_installs(tmp_path):
    r, calls = _pytest_with_fakes(tmp_path, TESTBED_DOCKER_TESTS="1")
    assert "docker compose version" in calls      # the gate opened: the tests asked the (fake) client
    assert not [c for c in calls if c.split()[0] in ("sudo", "apt-get", "debootstrap")]
    assert "no docker client with Compose v2 on PATH" in r.stdout
