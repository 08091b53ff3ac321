"""The project image: builds offline, imports the stack under a memory cap, can shape links with tc.

Needs a Docker daemon; runs only with ``CI=true`` or ``TESTBED_DOCKER_TESTS=1`` (tests/conftest.py,
which builds the session's own image with ``testbed/container/build-image.sh`` -- minutes the first
time -- and removes it afterwards).
"""
from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.docker

IMPORTS = "torch, transformers, simpy, opacus, matplotlib, pydantic, safetensors, tokenizers"


def _docker(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


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
