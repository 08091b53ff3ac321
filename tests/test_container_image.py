"""The project image: builds offline, imports the stack under a memory cap, can shape links with tc.

Needs a Docker daemon.  Without one these tests are skipped, except when ``CI=true``, where a missing
daemon is a failure (CI runs ``testbed/container/install-docker.sh`` first).  A missing image is built
with ``testbed/container/build-image.sh`` (minutes the first time).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("TESTBED_IMAGE", "collab-testbed:latest")
BUILD_SCRIPT = ROOT / "testbed" / "container" / "build-image.sh"
BUILD_TIMEOUT_S = int(os.environ.get("TESTBED_IMAGE_BUILD_TIMEOUT", "3600"))
IN_CI = os.environ.get("CI", "").lower() == "true"

IMPORTS = "torch, transformers, simpy, opacus, matplotlib, pydantic, safetensors, tokenizers"


def _docker(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def _no_daemon(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true but {reason} (run testbed/container/install-docker.sh)")
    pytest.skip(f"{reason}; run testbed/container/install-docker.sh to enable the container tests")


@pytest.fixture(scope="module")
def docker_daemon() -> None:
    if shutil.which("docker") is None:
        _no_daemon("no docker client on PATH")
    try:
        info = _docker("info", "--format", "{{.ServerVersion}}", timeout=30)
    except subprocess.TimeoutExpired:
        _no_daemon("`docker info` timed out")
    if info.returncode != 0 or not info.stdout.strip():
        detail = ((info.stderr or info.stdout).strip().splitlines() or ["no output"])[-1]
        _no_daemon(f"no Docker daemon reachable: {detail}")


@pytest.fixture(scope="module")
def image(docker_daemon) -> str:
    if _docker("image", "inspect", IMAGE, timeout=60).returncode != 0:
        if IMAGE != "collab-testbed:latest":
            pytest.fail(f"image {IMAGE} (from TESTBED_IMAGE) does not exist")
        try:
            build = subprocess.run(["bash", str(BUILD_SCRIPT)], cwd=ROOT, capture_output=True, text=True,
                                   timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{BUILD_SCRIPT.name} did not finish within {BUILD_TIMEOUT_S}s")
        assert build.returncode == 0, f"{BUILD_SCRIPT.name} failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
        assert _docker("image", "inspect", IMAGE, timeout=60).returncode == 0, "build script left no image"
    return IMAGE


def test_stack_imports_with_1g_memory_and_no_network(image):
    code = (f"import {IMPORTS}; "
            "assert torch.version.cuda is None, 'image has a CUDA build of torch'; "
            "print(torch.__version__); print('ok')")
    r = _docker("run", "--rm", "--memory", "1g", "--network", "none", "--entrypoint", "python", image, "-c", code,
                timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    lines = r.stdout.strip().splitlines()
    assert lines and lines[-1] == "ok", r.stdout
    assert lines[0].startswith("2.13.0"), f"torch version in the image: {lines[0]}"


def test_memory_limit_is_applied(image):
    # cgroup v2 (memory.max) or v1 (memory.limit_in_bytes): the container must actually be capped
    r = _docker("run", "--rm", "--memory", "1g", "--network", "none", "--entrypoint", "sh", image, "-c",
                "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
                timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(1 << 30), f"memory limit seen in the container: {r.stdout.strip()!r}"


def test_tc_tbf_with_net_admin(image):
    r = _docker("run", "--rm", "--cap-add", "NET_ADMIN", "--network", "none", "--entrypoint", "sh", image, "-c",
                "tc qdisc add dev lo root tbf rate 20mbit burst 32kbit latency 50ms && tc qdisc show dev lo",
                timeout=120)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "tbf" in r.stdout and "20Mbit" in r.stdout, r.stdout
