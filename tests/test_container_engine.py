"""The container engine without Docker: effect semantics against the embedded engine,
two engines over real TCP, and failing runs of real processes on loopback.

The Docker end-to-end runs (compose, the tiny PC-MoE and PrivateLoRA scenarios, link
shaping) are in tests/test_compose.py.
"""
import json
import random
import threading
import time

import pytest
import torch
import yaml

from parties.base import party_name
from testbed.run.capture import CaptureWriter
from testbed.engine.codec import Message, encode
from testbed.engine.devices import resolve_device
from testbed.engine.effects import Log, Recv, Send
from testbed.net.engine import ContainerEngine, Mailbox
from testbed.engine.sim import SimEngine
from testbed.errors import ConfigError, ProtocolError, TransportError
from testbed.engine.links import resolve_link
from testbed.net.identity import Identity, make_credentials
from testbed.net.transport import Node

from conftest import tiny_scenario


# -- a tiny protocol: out-of-order receive by kind, by source, tensors both ways ---------------
def alice():
    yield Send("bob", Message("b", step=0, tensors={"x": torch.arange(4, dtype=torch.float32)}))
    yield Send("bob", Message("a", step=0, meta={"n": 1}))
    reply = yield Recv(src="bob", kind="pong")
    yield Log({"event": "train", "party": "alice", "step": 0, "loss": float(reply.tensors["y"].sum())})


def bob():
    first = yield Recv(kind="a")          # the later message: "b" waits in the mailbox
    second = yield Recv(src="alice")      # now "b"
    assert (first.kind, second.kind, first.meta) == ("a", "b", {"n": 1})
    yield Send("alice", Message("pong", step=1, tensors={"y": second.tensors["x"] * 2}))
    yield Log({"event": "train", "party": "bob", "step": 0, "loss": 0.5})


def roles():
    return {"alice": alice(), "bob": bob()}


def _index(path):
    return [json.loads(line) for line in (path / "index.jsonl").read_text().splitlines()]


def _key(r):
    return (r["kind"], r["src"], r["dst"], r["bytes"], r["header_bytes"], r["step"], r["meta"])


def _sim(tmp_path):
    cap = CaptureWriter(tmp_path / "sim", "pp")
    logs = []
    ep = {r: (resolve_device("host"), resolve_link("lan")) for r in ("alice", "bob")}
    SimEngine("pp", ep, random.Random(0), on_log=logs.append, capture=cap, compute_mode="none").run(roles())
    cap.close()
    return _index(tmp_path / "sim"), logs


def test_one_process_matches_the_embedded_engine(tmp_path):
    sim_index, sim_logs = _sim(tmp_path)
    cap = CaptureWriter(tmp_path / "ce", "pp")
    logs = []
    eng = ContainerEngine("pp", "p", {"alice": "p", "bob": "p"}, None, Mailbox(), on_log=logs.append,
                          capture=cap)
    stats = eng.run(roles())
    cap.close()
    index = _index(tmp_path / "ce")
    assert [_key(r) for r in index] == [_key(r) for r in sim_index]
    assert [r["seq"] for r in index] == [0, 1, 2]
    assert stats["bytes"] == sum(r["bytes"] for r in sim_index) and stats["messages"] == 3
    # the byte count is the codec's: 4 + JSON header + raw tensor bytes
    assert index[0]["bytes"] == len(encode(Message("b", src="alice", dst="bob", step=0,
                                                   tensors={"x": torch.arange(4, dtype=torch.float32)})))
    assert index[0]["bytes"] == index[0]["header_bytes"] + 16
    assert {(r["role"], r["loss"]) for r in logs} == {(r["role"], r["loss"]) for r in sim_logs} \
        == {("alice", 12.0), ("bob", 0.5)}
    for r in logs:   # stamped like the embedded engine's records
        assert r["protocol"] == "pp" and r["sim_time"] == r["wall_time"] >= 0 and r["bytes"] > 0


def test_two_processes_over_tcp_match_the_embedded_engine(tmp_path):
    sim_index, _ = _sim(tmp_path)
    locate = {"alice": "A", "bob": "B"}
    boxes = {"A": Mailbox(), "B": Mailbox()}
    pki = make_credentials(tmp_path / "pki", list(boxes))
    nodes = {p: Node(Identity.from_dir(pki, p), host="127.0.0.1", owner=locate.get,
                     on_message=lambda m, a, n, p=p: boxes[p].put(m, n)) for p in boxes}
    nodes["A"].add_peer("B", ("127.0.0.1", nodes["B"].port))
    nodes["B"].add_peer("A", ("127.0.0.1", nodes["A"].port))
    caps = {p: CaptureWriter(tmp_path / p, "pp") for p in boxes}
    t0 = time.time()
    engines = {p: ContainerEngine("pp", p, locate, nodes[p], boxes[p], capture=caps[p], t0=t0,
                                  recv_timeout=120) for p in boxes}
    results, errors = {}, []

    def run(p, role):
        try:
            results[p] = engines[p].run({role: roles()[role]})
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=a) for a in (("A", "alice"), ("B", "bob"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for p in boxes:
        caps[p].close()
        nodes[p].close()
    assert not errors, errors
    merged = sorted(_index(tmp_path / "A") + _index(tmp_path / "B"), key=lambda r: r["sim_time"])
    assert [_key(r) for r in merged] == [_key(r) for r in sim_index]
    assert results["A"]["bytes"] + results["B"]["bytes"] == sum(r["bytes"] for r in sim_index)
    assert boxes["B"].reset()[0] == {"bob": sim_index[0]["bytes"] + sim_index[1]["bytes"]}


def test_send_errors_name_the_role(tmp_path):
    def reserved():
        yield Send("bob", Message("_table"))

    def unknown():
        yield Send("carol", Message("x"))
    eng = ContainerEngine("pp", "p", {"alice": "p", "bob": "p"}, None, Mailbox())
    with pytest.raises(ProtocolError, match="kind '_table' is reserved"):
        eng.run({"alice": reserved()})
    with pytest.raises(ProtocolError, match="unknown role 'carol'; roles: alice, bob"):
        eng.run({"alice": unknown()})
    with pytest.raises(ProtocolError, match="roles bob are not hosted here"):
        ContainerEngine("pp", "p", {"bob": "q"}, None, Mailbox()).run({"bob": unknown()})


def test_a_recv_that_is_never_answered_times_out_naming_role_and_wait():
    def lonely():
        yield Recv(src="bob", kind="turn")
    eng = ContainerEngine("pp", "p", {"alice": "p", "bob": "q"}, None, Mailbox(), recv_timeout=0.3)
    with pytest.raises(ProtocolError, match=r"alice: no message within 0.3s while waiting for a message "
                                            r"\(src='bob', kind='turn'\)"):
        eng.run({"alice": lonely()})


def test_a_failure_elsewhere_stops_a_waiting_role():
    def waits():
        yield Recv()
    box = Mailbox()
    eng = ContainerEngine("pp", "p", {"alice": "p"}, None, box)
    threading.Timer(0.1, box.fail, args=(TransportError("party-1 is gone"),)).start()
    with pytest.raises(TransportError, match="party-1 is gone"):
        eng.run({"alice": waits()})


def test_role_errors_carry_the_role():
    def broken():
        yield Log({})
        raise ValueError("boom")
    with pytest.raises(ValueError, match="boom") as info:
        ContainerEngine("pp", "p", {"alice": "p"}, None, Mailbox()).run({"alice": broken()})
    assert info.value.role == "alice"


def test_settings_report_every_problem():
    from testbed.container.settings import from_env
    with pytest.raises(ConfigError) as info:
        from_env({"PORT": "x", "COORDINATOR": "nohost", "SHAPING": "fast", "MAX_FRAME": "big",
                  "RUN_SECRET": "k"})
    text = str(info.value)
    for key in ("SCENARIO: required", "RUN_SECRET: no longer used", "PORT: expected a number",
                "COORDINATOR: expected host:port", "SHAPING: must be one of", "MAX_FRAME:"):
        assert key in text
    s = from_env({"SCENARIO": "x.yaml", "COORDINATOR": "10.0.0.2:9000", "MAX_FRAME": "2MiB"})
    assert s.coordinator == ("10.0.0.2", 9000) and s.max_frame == 2 << 20 and s.party is None
    assert s.credentials_dir == "/run/secrets"


# -- data isolation ------------------------------------------------------------------------------
def test_a_party_sees_only_its_own_shard(tmp_path):
    from testbed.container.prepare import prepare
    from testbed.container.shards import coordinator_view, party_view
    sc = tiny_scenario(baselines=[])
    info = prepare(sc, tmp_path / "data")
    assert info["parties"] == 2
    view, public = party_view(tmp_path / "data", sc, 1, "party-1")
    assert view.vocab_size == info["vocab_size"] and (public / "init-model" / "config.json").exists()
    assert view.parties[1].train.dtype == torch.int64 and len(view.parties) == 2
    with pytest.raises(ProtocolError, match="party-1: tried to read party-0's data"):
        view.parties[0].train
    assert {p.name for p in (tmp_path / "data").iterdir()} == {"prepared.json", "public", "truth",
                                                               "party-0", "party-1"}
    assert not (tmp_path / "data" / "party-1" / "truth").exists()
    pooled, _ = coordinator_view(tmp_path / "data", sc, pooled=True)
    assert torch.equal(pooled.parties[1].train, view.parties[1].train)
    with pytest.raises(ConfigError, match="prepared for scenario"):
        party_view(tmp_path / "data", tiny_scenario(seed=4), 1, "party-1")


def test_single_site_runs_need_no_party_containers():
    from testbed.container.coordinator import parties_needed
    assert parties_needed(tiny_scenario(protocol={"name": "centralized"}, baselines=[])) == 0
    assert parties_needed(tiny_scenario(protocol={"name": "centralized"}, baselines=["local"])) == 2


# -- failing runs of real processes ----------------------------------------------------------------
def _loopback(tmp_path, sc, **kw):
    from testbed.container.loopback import Loopback
    from testbed.container.prepare import prepare
    scenario_file = tmp_path / "scenario.yaml"
    scenario_file.write_text(yaml.safe_dump(sc.resolved()))
    prepare(sc, tmp_path / "data")
    return Loopback(sc, scenario_file, tmp_path / "data", tmp_path / "runs", "run", **kw)


def test_a_party_over_its_memory_budget_fails_the_run_naming_it(tmp_path):
    sc = tiny_scenario(baselines=[], parties={"count": 2, "overrides": {1: {"memory_budget": "4KiB"}}})
    lb = _loopback(tmp_path, sc)
    try:
        lb.start_coordinator()
        lb.start_parties()
        codes = lb.wait()
    finally:
        lb.kill()
    out = lb.text("coordinator")
    assert codes["coordinator"] == 4 and codes["party-1"] == 4, out
    manifest = json.loads((lb.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["mode"] == "containers"
    assert manifest["error"].startswith("party-1 failed in role party-1: BudgetExceeded: party-1: peak")
    assert "exceeds its budget 4.00 KiB" in manifest["error"]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _train(records, party):
    return [(r["protocol"], r["step"]) for r in records if r.get("event") == "train" and r.get("party") == party]


def _kill_mid_run(tmp_path, victim):
    sc = tiny_scenario(baselines=[], training={"steps": 400, "eval_every": 400})
    lb = _loopback(tmp_path, sc)
    try:
        lb.start_coordinator()
        lb.start_parties()
        deadline = time.monotonic() + 300
        while "[local] party-1 step 3/" not in lb.text("coordinator") and time.monotonic() < deadline:
            time.sleep(0.1)
        t = time.monotonic()
        lb.procs[victim].kill()    # as the kernel's OOM killer would
        codes = lb.wait()
        waited = time.monotonic() - t
    finally:
        lb.kill()
    return lb, codes, waited


def test_a_party_that_dies_fails_the_run_naming_it_and_loses_no_line(tmp_path):
    from testbed.container.coordinator import ABORT_WAIT_S
    lb, codes, waited = _kill_mid_run(tmp_path, party_name(1))
    manifest = json.loads((lb.run_dir / "manifest.json").read_text())
    assert codes["coordinator"] == 1, lb.text("coordinator")
    assert manifest["status"] == "failed" and manifest["end"]
    assert manifest["error"].startswith("party-1: connection lost before it finished")
    # the coordinator does not wait for a goodbye from the dead party
    assert waited < ABORT_WAIT_S, lb.text("coordinator")
    metrics = _lines(lb.run_dir / "metrics.jsonl")
    for p in ("party-0", "party-1"):   # every line each party wrote -- the dead one's too -- is merged
        part = _train(_lines(lb.parts / p / "metrics.jsonl"), p)
        assert part and _train(metrics, p) == part
    assert lb.parts.is_dir()           # a failed run keeps its parts


def test_a_coordinator_that_dies_is_merged_from_its_parts_and_named(tmp_path):
    lb, codes, _ = _kill_mid_run(tmp_path, "coordinator")
    assert codes["party-0"] == codes["party-1"] == 5, lb.text("party-0")   # lost the coordinator
    assert json.loads((lb.run_dir / "manifest.json").read_text())["status"] == "running"
    manifest = lb.recover("coordinator: killed (exit code -9)")
    assert manifest["status"] == "failed" and manifest["error"] == "coordinator: killed (exit code -9)"
    metrics = _lines(lb.run_dir / "metrics.jsonl")
    for p in ("party-0", "party-1"):
        part = _train(_lines(lb.parts / p / "metrics.jsonl"), p)
        assert len(part) >= 3 and _train(metrics, p) == part
    truth = _lines(lb.run_dir / "truth" / "tokens.jsonl")
    assert len(truth) == sum(len(_lines(lb.parts / p / "truth" / "tokens.jsonl")) for p in ("party-0", "party-1"))
    assert lb.recover("again")["error"] == "again"                 # merging twice duplicates nothing
    assert len(_lines(lb.run_dir / "metrics.jsonl")) == len(metrics)


def test_a_process_that_drops_to_run_as_keeps_no_capability(tmp_path):
    """What a party does once its link is shaped: uid 0 -> RUN_AS, and NET_ADMIN is gone."""
    import os
    import subprocess
    import sys
    if os.getuid() != 0:
        pytest.skip("needs root: the switch is from uid 0")
    code = ("from testbed.container.process import drop_privileges, effective_capabilities as e;"
            "import os; before = e(); after = drop_privileges();"
            "print(before & (1 << 12) != 0, os.getuid(), os.getgid(), os.getgroups(), after)")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RUN_AS": "65534:65534"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # CAP_NET_ADMIN (bit 12) before, when the test runs with it; nothing after
    assert r.stdout.split()[1:] == ["65534", "65534", "[]", "0"], r.stdout
