"""Shared fixtures: tiny scenarios that run in seconds on a CPU, and the Docker gate.

Tests marked ``docker`` build an image and start containers on the host's Docker daemon.  They
run only when asked -- ``CI=true`` or ``TESTBED_DOCKER_TESTS=1`` -- and are skipped with that
reason otherwise, so a plain ``python -m pytest`` never runs a ``docker`` command.  When they run,
everything they create is private to the test session: the image tag
(``collab-testbed:test-<id>``, removed at the end; or ``$TESTBED_IMAGE``, kept), the build logs
(in the session's temporary directory) and the prune filter (that tag's label).  Nothing in the
test suite installs system packages: the image build runs with ``INSTALL_MISSING=0``.
"""
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from testbed.scenario import parse_scenario

ROOT = Path(__file__).resolve().parents[1]

# The tests' models are tiny: one thread is as fast, and it keeps parallel jobs from thrashing.
torch.set_num_threads(1)

TINY = {
    "name": "tiny",
    "seed": 3,
    "model": {"family": "mixtral", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
              "num_kv_heads": 1, "intermediate_size": 48, "num_experts": 4, "top_k": 2},
    "data": {"records": 40, "kinds": ["patient_note", "email"], "canaries": {"count": 2},
             "tokenizer": {"vocab_size": 300}, "split": {"method": "iid"}},
    "protocol": {"name": "local"},
    "baselines": ["centralized"],
    "parties": {"count": 2},
    "training": {"steps": 4, "batch_size": 2, "seq_len": 16, "eval_every": 2, "eval_batches": 1},
    "compute": {"mode": "none"},
}


def tiny_scenario(**overrides):
    """The TINY scenario with top-level sections merged from ``overrides``."""
    from testbed.scenario import deep_merge
    return parse_scenario(deep_merge(TINY, overrides), "<tiny>")


@pytest.fixture
def run_tiny(tmp_path):
    """Run a tiny scenario into tmp_path; returns (run path, summary)."""
    from testbed.run.runner import run_scenario

    def _run(sc=None, **overrides):
        sc = sc or tiny_scenario(**overrides)
        return run_scenario(sc, runs_root=tmp_path / "runs", base_dir=ROOT,
                            cache_dir=tmp_path / "cache", progress=False)
    return _run


# -- Real tiny runs the report tests read (test_report*.py) ---------------------------------------
LLAMA = {"family": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 48}
# The quickstart scenario, shrunk to seconds: same protocols, parties, split and attacks.
QUICK = {"model": {"hidden_size": 32, "num_layers": 1, "intermediate_size": 48, "num_experts": 4},
         "data": {"records": 48, "tokenizer": {"vocab_size": 300}, "canaries": {"count": 2}},
         "training": {"steps": 4, "batch_size": 2, "seq_len": 16, "eval_every": 2, "eval_batches": 1},
         "attacks": [{"name": "embedding-nn", "options": {"steps": [0, 3]}},
                     {"name": "routing-trace", "options": {"steps": [0, 3]}}]}


def fedsgd_tiny(root, **overrides):
    """A run of scenarios/fedsgd-tiny.yaml into ``root``, 2 rounds and no baselines unless
    ``overrides`` (scenario sections merged on top) say otherwise."""
    from testbed.scenario import deep_merge, load_scenario
    base = {"baselines": [], "training": {"steps": 2}, "compute": {"mode": "none"}, "attacks": []}
    sc = load_scenario(ROOT / "scenarios" / "fedsgd-tiny.yaml", deep_merge(base, overrides))
    return _run(sc, root)


@pytest.fixture(scope="session")
def fedsgd_tiny_run(tmp_path_factory):
    """scenarios/fedsgd-tiny.yaml, 2 rounds, no baselines: the gradient attacks' capture."""
    return fedsgd_tiny(tmp_path_factory.mktemp("fedsgd-tiny"))


def _run(sc, root):
    from testbed.run.runner import run_scenario
    path, _ = run_scenario(sc, runs_root=root / "runs", base_dir=ROOT, cache_dir=root / "cache", progress=False)
    return path


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """scenarios/quickstart.yaml (PC-MoE + centralized + local, 4 parties, its attacks), shrunk."""
    from testbed.scenario import load_scenario
    return _run(load_scenario(ROOT / "scenarios" / "quickstart.yaml", QUICK), tmp_path_factory.mktemp("quick"))


@pytest.fixture(scope="session")
def fed_run(tmp_path_factory):
    """FedSGD with DP-SGD on a dense LLaMA, a centralized baseline and the bag-of-tokens attack:
    traffic, attack scores and epsilon in one tiny run."""
    sc = tiny_scenario(model=LLAMA, protocol={"name": "fedsgd"}, attacks=["bag-of-tokens"],
                       defences=[{"type": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0}])
    return _run(sc, tmp_path_factory.mktemp("fed"))


# -- Docker: opt-in, session-private ------------------------------------------------------------
SESSION_ID = secrets.token_hex(4)   # names this session's image, compose projects and runs
DOCKER_SKIP_REASON = ("Docker tests run only with CI=true or TESTBED_DOCKER_TESTS=1 "
                      "(they build an image and start containers on the host's daemon)")


def docker_tests_enabled(env=os.environ):
    """True when the Docker tests were asked for: ``CI=true`` or ``TESTBED_DOCKER_TESTS=1``."""
    return env.get("CI", "").lower() == "true" or env.get("TESTBED_DOCKER_TESTS", "") == "1"


def pytest_collection_modifyitems(config, items):
    if docker_tests_enabled():
        return
    skip = pytest.mark.skip(reason=DOCKER_SKIP_REASON)
    for item in items:
        if "docker" in item.keywords:
            item.add_marker(skip)


def no_docker(reason):
    """Skip (or, under CI=true, fail) a Docker test whose daemon or client is missing."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason} (run testbed/container/install-docker.sh)")
    pytest.skip(f"{reason}; run testbed/container/install-docker.sh to enable the container tests")


def _docker(*args, timeout=300):
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def docker_cli():
    """A docker client with Compose v2 on PATH (skips / fails without)."""
    if shutil.which("docker") is None or _docker("compose", "version", timeout=60).returncode != 0:
        no_docker("no docker client with Compose v2 on PATH")


@pytest.fixture(scope="session")
def docker_daemon(docker_cli):
    """A Docker daemon that answers (skips / fails without)."""
    try:
        info = _docker("info", "--format", "{{.ServerVersion}}", timeout=30)
    except subprocess.TimeoutExpired:
        no_docker("`docker info` timed out")
    if info.returncode != 0 or not info.stdout.strip():
        detail = ((info.stderr or info.stdout).strip().splitlines() or ["no output"])[-1]
        no_docker(f"no Docker daemon reachable: {detail}")


@pytest.fixture(scope="session")
def image(docker_daemon, tmp_path_factory):
    """The project image, current with the sources: ``$TESTBED_IMAGE`` (kept) or a tag of this
    test session's own, built by build-image.sh (from the build cache when the inputs are
    unchanged) and removed when the session ends."""
    given = os.environ.get("TESTBED_IMAGE")
    tag = given or f"collab-testbed:test-{SESSION_ID}"
    logs = tmp_path_factory.mktemp("docker-build-logs")
    env = {**os.environ, "IMAGE": tag, "LOG_DIR": str(logs), "INSTALL_MISSING": "0", "PRUNE_DEPS": "0"}
    timeout = int(os.environ.get("TESTBED_IMAGE_BUILD_TIMEOUT", "3600"))
    try:
        build = subprocess.run(["bash", str(ROOT / "testbed/container/build-image.sh")], cwd=ROOT, text=True,
                               capture_output=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"build-image.sh did not finish within {timeout}s (logs: {logs})")
    assert build.returncode == 0, f"build-image.sh failed (logs: {logs}):\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    yield tag
    if not given:
        _docker("image", "rm", "-f", tag, timeout=120)
