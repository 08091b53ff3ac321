"""FedAvg and split learning with 4 parties under Docker Compose, against the embedded engine.

``scenarios/fedavg-4party.yaml`` and ``scenarios/split-4party.yaml`` (shortened to 3 training
steps and one eval batch) through ``python -m testbed up``: one container per party plus the
coordinator's, which hosts the server-side role (FedAvg's ``coordinator``, split learning's
``server``).  For the same seed the run directories match the embedded engine's: the same
files, the same captured messages (kind, src, dst, bytes -- and their totals), the same
per-step train losses and eval losses of every protocol in the run (keyed by protocol, party
and step), the same ground truth, the same wire bytes, message counts and peak memory per
role in the summary; and each party ran in its own container under its memory limit.

Needs a Docker daemon and the project image (built with build-image.sh when out of date).
They run only with ``CI=true`` or ``TESTBED_DOCKER_TESTS=1`` (the Docker fixtures are in
tests/conftest.py); the helpers are tests/test_compose.py's.
"""
import json
import subprocess
import sys
import time

import pytest
import yaml

from testbed.cli.run import _override
from testbed.rundir import read_metrics
from testbed.units import parse_size

# the run-directory checks (the Docker fixtures are tests/conftest.py's)
from conftest import SESSION_ID
from test_compose import ROOT, _capture, _embedded, _same_run

SHORT = ["training.steps=3", "training.eval_batches=1"]
MEM_OVERHEAD = "512MiB"


def _up(image, tmp_path, scenario, name, sets):
    args = [a for s in sets for a in ("--set", s)]
    r = subprocess.run([sys.executable, "-m", "testbed", "up", scenario, "--runs", str(tmp_path / "runs"),
                        "--name", name, "--no-build", "--image", image, "--mem-overhead", MEM_OVERHEAD,
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return tmp_path / "runs" / name, r.stdout


def _losses(path, event, key):
    """{(protocol, party, step): loss} -- every protocol of the run, baselines included."""
    out = {}
    for r in read_metrics(path):
        if r.get("event") == event:
            k = (r["protocol"], r["party"], r["step"])
            assert k not in out, f"two {event} records for {k}"
            out[k] = r[key]
    return out


def _check(embedded, containers, stdout, protocol, server_roles, parties=4, steps=3):
    _same_run(embedded, containers)
    # per protocol: _same_run keys losses by (party, step) only, which baselines would overwrite
    for event, key in (("train", "loss"), ("eval", "eval_loss")):
        le, lc = _losses(embedded, event, key), _losses(containers, event, key)
        assert set(lc) == set(le)
        assert all(lc[k] == pytest.approx(le[k], rel=1e-5, abs=1e-6) for k in le), (le, lc)
    train = {k: v for k, v in _losses(containers, "train", "loss").items() if k[0] == protocol}
    assert set(train) == {(protocol, f"party-{i}", t) for i in range(parties) for t in range(steps)}
    ce = _capture(embedded)
    assert ce and {r["src"] for r in ce} == {*(f"party-{i}" for i in range(parties)), *server_roles}
    se, sc = (json.loads((p / "summary.json").read_text())["protocols"] for p in (embedded, containers))
    assert set(sc) == set(se)
    for name in se:
        assert (sc[name]["bytes"], sc[name]["messages"]) == (se[name]["bytes"], se[name]["messages"])
        assert sc[name]["peak_memory"] == se[name]["peak_memory"]
    assert se[protocol]["bytes"] == sum(r["bytes"] for r in ce)
    # one container per party, each under its budget + the overhead; the server side in the coordinator's
    manifest = json.loads((containers / "manifest.json").read_text())
    assert manifest["containers"]["parties"] == parties
    services = yaml.safe_load((containers / "compose.rendered.yaml").read_text())["services"]
    assert set(services) == {"prepare", "coordinator", *(f"party-{i}" for i in range(parties))}
    limit = (1 << 30) + parse_size(MEM_OVERHEAD)   # parties.memory_budget: 1GiB
    assert all(services[f"party-{i}"]["mem_limit"] == limit for i in range(parties))
    for i in range(parties):
        assert f"[{protocol}] party-{i} step {steps}/{steps} loss" in stdout
    return se[protocol], {k: v for k, v in _losses(containers, "train", "loss").items() if k[0] == protocol}


def _links(run):
    return {(r["kind"], r["src"], r["dst"]) for r in _capture(run)}


def _report(label, summary, losses, seconds):
    first = [round(v, 4) for (_, party, _), v in sorted(losses.items()) if party == "party-0"]
    print(f"{label}: {len(losses)} train losses equal (party-0: {first}); {summary['messages']} "
          f"messages, {summary['bytes']} bytes; embedded {seconds[0]:.0f}s, up {seconds[1]:.0f}s")


def _both(image, tmp_path, scenario, name, sets):
    t = time.monotonic()
    embedded = _embedded(tmp_path, scenario, _override(sets))
    t1 = time.monotonic()
    run, stdout = _up(image, tmp_path, scenario, name, sets)
    return embedded, run, stdout, (t1 - t, time.monotonic() - t1)


@pytest.mark.docker
@pytest.mark.slow
def test_fedavg_4party_under_up_matches_embedded(image, tmp_path):
    """The coordinator role averages in the coordinator's container; 4 parties train in theirs;
    the baselines (centralized on the pooled data, local in the party containers) run too."""
    embedded, run, stdout, seconds = _both(image, tmp_path, "scenarios/fedavg-4party.yaml",
                                                 f"fedavg-{SESSION_ID}", SHORT)
    summary, losses = _check(embedded, run, stdout, "fedavg", {"coordinator"})
    assert _links(run) == {link for i in range(4) for link in (
        ("round", "coordinator", f"party-{i}"), ("delta", f"party-{i}", "coordinator"),
        ("update", "coordinator", f"party-{i}"))}
    assert summary["messages"] == 3 * 3 * 4   # per round: round, delta, update per party
    assert "[centralized] site step 3/3" in stdout and "[local] party-3 step 3/3" in stdout
    _report("fedavg-4party", summary, losses, seconds)


@pytest.mark.docker
@pytest.mark.slow
def test_split_4party_under_up_matches_embedded(image, tmp_path):
    """The server role (blocks 1.., the LM head) runs in the coordinator's container."""
    embedded, run, stdout, seconds = _both(image, tmp_path, "scenarios/split-4party.yaml", f"split-{SESSION_ID}",
                                           [*SHORT, "baselines=[]",
                                            # the attack step of the container route, without
                                            # whitebox inversion's minutes
                                            "attacks=[{name: embedding-nn, options: {steps: [0]}}]"])
    summary, losses = _check(embedded, run, stdout, "split", {"server"})
    assert _links(run) == {link for i in range(4) for up, down in (("act", "grad"), ("eval_act", "eval_out"))
                           for link in ((up, f"party-{i}", "server"), (down, "server", f"party-{i}"))}
    # per step and party: act + grad; at the last step one eval batch each: eval_act + eval_out
    assert summary["messages"] == 3 * 4 * 2 + 4 * 2
    _report("split-4party", summary, losses, seconds)
