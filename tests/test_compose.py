"""Container mode under Docker Compose, end to end, against the embedded engine.

* the rendered per-run compose file: each party mounts only its shard, with its limits;
* ``compose.yaml`` / ``compose.gpu.yaml`` are valid compose files (``docker compose config``);
* ``scenarios/pcmoe-tiny.yaml`` through ``python -m testbed up`` -- with shaped links (parties
  20 Mbit/s up, 50 ms; the coordinator unshaped) whose measured bandwidth and latency are
  checked -- and ``scenarios/privatelora-tiny.yaml`` through the plain ``compose.yaml``: the
  run directories have the embedded engine's layout, the captured messages (kind, src, dst,
  bytes) and the per-step losses are the embedded engine's for the same seed;
* a party container over its memory limit is reported as OOM-killed, naming the party.

Needs a Docker daemon and the project image (built here with build-image.sh when it is out of
date).  The Docker tests run only with ``CI=true`` or ``TESTBED_DOCKER_TESTS=1`` (tests/conftest.py);
their image, compose projects and logs are private to the test session.
"""
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from testbed.rundir import read_metrics
from testbed.scenario import load_scenario
from testbed.units import parse_size

from conftest import SESSION_ID

ROOT = Path(__file__).resolve().parents[1]
SHAPED = ["--set", "parties.link={up_mbps: 20, down_mbps: 100, latency_ms: 50}",
          "--set", "coordinator.link={up_mbps: 1000, down_mbps: 1000, latency_ms: 0}"]


# -- the rendered file ---------------------------------------------------------------------------
def test_rendered_compose_gives_each_party_only_its_shard_and_limits(tmp_path):
    from testbed.container.render import render_compose
    sc = load_scenario(ROOT / "scenarios/pcmoe-tiny.yaml", {
        "parties": {"memory_budget": "300MiB", "cpus": 1.5, "overrides": {1: {"memory_budget": "1GiB"}}},
        "coordinator": {"cpus": 2}})
    c = render_compose(sc, image="img", work_dir=tmp_path / "w", runs_dir=tmp_path / "runs", project_dir=ROOT,
                       run_name="r", credentials_dir=tmp_path / "keys", n_parties=2,
                       mem_overhead=parse_size("512MiB"))
    s = c["services"]
    assert set(s) == {"prepare", "coordinator", "party-0", "party-1"}
    assert c["networks"] == {"testbed": {"internal": True}}
    w = (tmp_path / "w").resolve()
    for i, budget in ((0, 300 << 20), (1, 1 << 30)):
        p = s[f"party-{i}"]
        data = [v for v in p["volumes"] if ":/data" in v]
        assert data == [f"{w}/data/party-{i}:/data/party-{i}:ro"]
        assert f"{w}/parts/party-{i}:/parts/party-{i}" in p["volumes"]
        assert p["mem_limit"] == budget + (512 << 20) and p["cpus"] == 1.5
        assert p["environment"]["TESTBED_THREADS"] == "1"    # the embedded engine's default
        assert p["environment"]["PARTY"] == str(i) and p["environment"]["COORDINATOR"] == "coordinator:7070"
        assert p["environment"]["TESTBED_GPU_MEMORY_BUDGET"] == str(budget)
        assert p["cap_add"] == ["NET_ADMIN"] and p["networks"] == ["testbed"]
        assert p["environment"]["RUN_AS"] == "65534:65534"     # unprivileged once shaped
        # only its own key, as files; the CA certificate to check everybody else's
        assert p["secrets"] == [{"source": "ca", "target": "ca.crt"},
                                {"source": f"party-{i}-crt", "target": f"party-{i}.crt"},
                                {"source": f"party-{i}-key", "target": f"party-{i}.key"}]
    co = s["coordinator"]
    assert f"{w}/data:/data:ro" in co["volumes"] and co["cpus"] == 2
    assert co["mem_limit"] == 6 << 30 and [x["source"] for x in co["secrets"]] == ["ca", "coordinator-crt",
                                                                                  "coordinator-key"]
    assert s["prepare"]["network_mode"] == "none"
    for svc in s.values():   # limits for every container, the coordinator included; no key in a variable
        assert svc["mem_limit"] > 0 and svc["cpus"] > 0 and svc["pids_limit"] == 512
        assert svc["security_opt"] == ["no-new-privileges:true"]
        assert not any("SECRET" in k or "KEY" in k for k in svc["environment"])
    assert c["secrets"]["party-1-key"] == {"file": str(tmp_path / "keys" / "party-1.key")}


def test_rendered_compose_runs_torch_with_the_embedded_engines_thread_count(tmp_path):
    """Containers get ``--threads`` (not their CPU limit): only equal thread counts give the
    two engines bit-identical reductions."""
    from testbed.container.render import render_compose
    sc = load_scenario(ROOT / "scenarios/pcmoe-tiny.yaml", {"parties": {"cpus": 1.5}})
    c = render_compose(sc, image="img", work_dir=tmp_path / "w", runs_dir=tmp_path / "runs", project_dir=ROOT,
                       run_name="r", credentials_dir=tmp_path / "keys", n_parties=2, threads=3)
    assert {s["environment"]["TESTBED_THREADS"] for s in c["services"].values()} == {"3"}


@pytest.mark.docker
def test_compose_files_are_valid(docker_cli):
    env = {**os.environ, "SCENARIO": "scenarios/pcmoe-tiny.yaml", "PARTIES": "3", "PARTY_MEMORY": "1g"}
    r = subprocess.run(["docker", "compose", "-f", "compose.yaml", "-f", "compose.gpu.yaml", "config",
                        "--format", "json"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    party, coord = cfg["services"]["party"], cfg["services"]["coordinator"]
    assert party["deploy"]["replicas"] == 3 and party["cap_add"] == ["NET_ADMIN"]
    assert int(party["deploy"]["resources"]["limits"]["memory"]) == 1 << 30
    assert party["deploy"]["resources"]["reservations"]["devices"] == [
        {"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]
    assert "TESTBED_GPU_MEMORY_FRACTION" in party["environment"]
    assert cfg["networks"]["testbed"]["internal"] is True
    # no one-shot service: one that exits would end `up --exit-code-from coordinator` early
    assert set(cfg["services"]) == {"coordinator", "party"} and coord["environment"]["SETUP"] == "1"
    assert coord["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    for svc in cfg["services"].values():   # limits for every container; keys never in a variable
        limits = svc.get("deploy", {}).get("resources", {}).get("limits", {})
        assert 512 in (svc.get("pids_limit"), limits.get("pids")) and svc["security_opt"] == ["no-new-privileges:true"]
        assert not any("SECRET" in k for k in svc.get("environment") or {})
    assert int(coord["deploy"]["resources"]["limits"]["memory"]) == 6 << 30
    assert party["environment"]["RUN_AS"] == "65534:65534"
    assert {"source": "credentials", "target": "/run/secrets", "read_only": True, "type": "volume"}.items() \
        <= {k: v for m in party["volumes"] if m["target"] == "/run/secrets" for k, v in m.items()}.items()
    # `docker compose down -v` (and config) need no variable at all
    bare = {k: v for k, v in os.environ.items() if k not in ("SCENARIO", "PARTIES", "RUN_SECRET")}
    quiet = subprocess.run(["docker", "compose", "-f", "compose.yaml", "config", "-q"], cwd=ROOT,
                           capture_output=True, text=True, env=bare)
    assert quiet.returncode == 0, quiet.stderr
    down = subprocess.run(["docker", "compose", "-p", f"testbed-down-{secrets.token_hex(3)}", "-f", "compose.yaml",
                           "down", "-v"], cwd=ROOT, capture_output=True, text=True, env=bare)
    assert down.returncode == 0, down.stderr


# -- end to end ---------------------------------------------------------------------------------------
def _embedded(tmp_path, scenario, overrides=None):
    from testbed.run.runner import run_scenario
    sc = load_scenario(ROOT / scenario, overrides)
    path, _ = run_scenario(sc, runs_root=tmp_path / "embedded", base_dir=ROOT, cache_dir=None, progress=False)
    return path


def _files(path):
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {"compose.rendered.yaml"}


def _capture(path):
    return [json.loads(line) for line in (path / "capture/index.jsonl").read_text().splitlines()]


def _same_run(embedded, containers):
    assert json.loads((containers / "manifest.json").read_text())["mode"] == "containers"
    assert json.loads((containers / "manifest.json").read_text())["status"] == "ok"
    assert _files(containers) == _files(embedded)
    ce, cc = _capture(embedded), _capture(containers)
    fields = lambda r: (r["kind"], r["src"], r["dst"], r["bytes"])  # noqa: E731
    assert sum(r["bytes"] for r in cc) == sum(r["bytes"] for r in ce)
    assert sorted(map(fields, cc)) == sorted(map(fields, ce))
    for src in {r["src"] for r in ce}:   # each sender's messages in the same order
        assert [fields(r) for r in cc if r["src"] == src] == [fields(r) for r in ce if r["src"] == src]

    def losses(path, event, key):
        return {(r["protocol"], r["party"], r["step"]): r[key] for r in read_metrics(path) if r.get("event") == event}
    for event, key in (("train", "loss"), ("eval", "eval_loss")):
        le, lc = losses(embedded, event, key), losses(containers, event, key)
        assert le and set(le) == set(lc)
        assert all(lc[k] == pytest.approx(le[k], rel=1e-5, abs=1e-6) for k in le), (le, lc)
    truth = lambda p: sorted((p / "truth/tokens.jsonl").read_text().splitlines())  # noqa: E731
    assert truth(containers) == truth(embedded)


@pytest.mark.docker
@pytest.mark.slow
def test_pcmoe_tiny_under_up_matches_embedded_and_shapes_its_links(image, tmp_path):
    sets = {"parties": {"link": {"up_mbps": 20, "down_mbps": 100, "latency_ms": 50}},
            "coordinator": {"link": {"up_mbps": 1000, "down_mbps": 1000, "latency_ms": 0}}}
    embedded = _embedded(tmp_path, "scenarios/pcmoe-tiny.yaml", sets)
    r = subprocess.run([sys.executable, "-m", "testbed", "up", "scenarios/pcmoe-tiny.yaml", "--runs",
                        str(tmp_path / "runs"), "--name", f"pcmoe-{SESSION_ID}", "--no-build", "--image", image,
                        "--probe-bytes", "2MiB", *SHAPED], cwd=ROOT, capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "[pcmoe] party-0 step 1/6 loss" in r.stdout and "mean eval loss" in r.stdout
    run = tmp_path / "runs" / f"pcmoe-{SESSION_ID}"
    _same_run(embedded, run)
    assert not (tmp_path / "runs" / ".work").exists()
    assert yaml.safe_load((run / "compose.rendered.yaml").read_text())["networks"]["testbed"]["internal"]
    links = {(m["src"], m["dst"]): m for m in read_metrics(run) if m.get("event") == "link" and "rtt_ms" in m}
    up = links[("party-0", "coordinator")]
    print(f"measured party-0 -> coordinator: {up['probe_mbps']:.2f} Mbit/s (configured 20), "
          f"{up['latency_ms']:.2f} ms (configured 50); all: "
          + "; ".join(f"{s}->{d} {m['probe_mbps']:.1f} Mbit/s {m['latency_ms']:.1f} ms"
                      for (s, d), m in links.items()))
    assert up["probe_mbps"] == pytest.approx(20, rel=0.10)
    assert up["latency_ms"] == pytest.approx(50, abs=5)


@pytest.mark.docker
@pytest.mark.slow
def test_privatelora_tiny_under_plain_compose_matches_embedded(image, tmp_path):
    embedded = _embedded(tmp_path, "scenarios/privatelora-tiny.yaml")
    project = f"testbed-test-{SESSION_ID}-{secrets.token_hex(2)}"
    env = {**os.environ, "SCENARIO": "scenarios/privatelora-tiny.yaml", "PARTIES": "1",
           "RESULTS": str(tmp_path / "runs"), "RUN_NAME": "plora", "TESTBED_IMAGE": image}
    env.pop("RUN_SECRET", None)
    compose = ["docker", "compose", "-p", project, "-f", "compose.yaml"]
    try:
        r = subprocess.run([*compose, "up", "--no-color", "--exit-code-from", "coordinator"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=1200)
    finally:
        subprocess.run([*compose, "down", "-v", "-t", "5"], cwd=ROOT, env=env, capture_output=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "[privatelora] party-0 step 4/4" in r.stdout
    # replica <project>-party-1 is party-0, and says so
    assert f"party-0 (container {project}-party-1): registered" in r.stdout
    _same_run(embedded, tmp_path / "runs" / "plora")
    assert not [p for p in (tmp_path / "runs" / ".parts").rglob("*") if p.is_file()]


@pytest.mark.docker
@pytest.mark.slow
def test_a_party_over_its_container_memory_limit_is_reported_oom_killed(image, tmp_path):
    r = subprocess.run([sys.executable, "-m", "testbed", "up", "scenarios/pcmoe-tiny.yaml", "--runs",
                        str(tmp_path / "runs"), "--name", f"oom-{SESSION_ID}", "--no-build", "--image", image,
                        "--mem-overhead", "0", "--set", "parties.overrides={1: {memory_budget: 48MiB}}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode != 0, r.stdout[-3000:]
    assert "party-1: container OOM-killed (memory limit 48.00 MiB)" in r.stderr, r.stdout[-3000:] + r.stderr
    manifest = json.loads((tmp_path / "runs" / f"oom-{SESSION_ID}" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "party-1: container OOM-killed" in manifest["error"]
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project=testbed-oom-{SESSION_ID}"],
                          capture_output=True, text=True)
    assert left.stdout.strip() == ""   # torn down after the failure too
