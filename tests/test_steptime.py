"""Tests for the PC-MoE step-time model (testbed/costs/steptime.py, the baselines, the CLI).

The model must give the embedded engine's simulated step times: a tiny 4-party PC-MoE
run in ``compute: flops`` mode, its per-step expert traffic read back from the capture,
must match step for step (within 1%; the rules are the same, so in fact to rounding).
Golden numbers for Mixtral-8x7B: bytes and FLOPs per step from the formulas.
"""
import json
import math

import pytest
import torch

from parties.shapes import meta_model
from testbed import cli
from testbed.costs.steptime import (Deployment, MoEShape, Routing, control_bytes, exchange_seconds,
                                    layer_traffic, mean_pcmoe_step, pcmoe_step, routing_from_run)
from testbed.costs.steptime_baselines import centralized_step, fedavg_step, split_step
from testbed.costs.throughput import frame_bytes
from testbed.engine import codec, devices, links
from testbed.engine.codec import Message
from testbed.run.runner import run_scenario
from testbed.scenario import LinkCfg, parse_scenario

A100 = devices.PROFILES["a100"]
SLOW = {"up_mbps": 10, "down_mbps": 10, "latency_ms": 1.0}


def _run(tmp_path, link, device, name):
    sc = parse_scenario({
        "name": name, "seed": 1,
        "model": {"family": "mixtral", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64, "num_experts": 8, "top_k": 2},
        "data": {"source": "generate", "kinds": ["patient_note", "support_ticket"], "records": 40,
                 "eval_fraction": 0.2, "tokenizer": {"vocab_size": 128}},
        "protocol": {"name": "pcmoe"}, "baselines": [],
        "parties": {"count": 4, "device": device, "link": link},
        "coordinator": {"device": device, "link": link},
        "compute": {"mode": "flops"},
        "training": {"steps": 6, "batch_size": 4, "seq_len": 16, "eval_every": 100, "eval_batches": 1}})
    run_dir, _ = run_scenario(sc, runs_root=str(tmp_path), cache_dir=None, progress=False)
    return sc, run_dir


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("runs"), SLOW, "host", "steptime-slow")


def _engine_vs_model(sc, run_dir):
    from parties.models import build_model
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r.get("event") == "train" and r.get("protocol") == "pcmoe"]
    index = [json.loads(x) for x in (run_dir / "capture" / "index.jsonl").read_text().splitlines()]
    vocab = json.loads((run_dir / "public" / "init-model" / "config.json").read_text())["vocab_size"]
    shape = MoEShape.from_model(build_model(sc.model, vocab, sc.seed), dtype_bytes=4)
    link = links.resolve_link(sc.parties.link)
    dep = Deployment(devices.PROFILES[sc.parties.device], link, link)
    pairs = []
    for prev, r in zip(train, train[1:]):
        traffic = {layer: {} for layer in range(shape.layers)}
        for m in index:
            if m["kind"] == "expert_fwd" and m["step"] == r["step"]:
                traffic[m["meta"]["layer"]][int(m["meta"]["host"].split("-")[1])] = (
                    m["meta"]["experts"], m["meta"]["counts"])
        owner = int(r["party"].split("-")[1])
        model = pcmoe_step(shape, dep, 4, owner, traffic, r["local_pairs"], 4, 16, step=r["step"],
                           count_attention=False, memory_traffic=False)
        step_bytes = sum(m["bytes"] for m in index if m["step"] == r["step"] and m["kind"].startswith("expert"))
        assert model["bytes"] == step_bytes                       # every expert message, framing included
        pairs.append((r["sim_time"] - prev["sim_time"], model["total_s"]))
    return shape, dep, pairs


def test_model_gives_the_engines_step_times_on_a_slow_link(slow_run):
    sc, run_dir = slow_run
    _, _, pairs = _engine_vs_model(sc, run_dir)
    assert len(pairs) == 5
    for engine, model in pairs:
        print(f"engine {engine:.9f} s, model {model:.9f} s, {abs(model - engine) / engine:.2e}")
        assert abs(model - engine) / engine < 0.01
        assert model == pytest.approx(engine, rel=1e-9)      # the same rules: equal to rounding


def test_model_gives_the_engines_step_times_when_compute_dominates(tmp_path):
    sc, run_dir = _run(tmp_path, "ideal", "host", "steptime-ideal")
    _, dep, pairs = _engine_vs_model(sc, run_dir)
    for engine, model in pairs:
        assert model == pytest.approx(engine, rel=1e-9)


def test_measured_routing_from_the_run_directory(slow_run):
    sc, run_dir = slow_run
    shape, dep, pairs = _engine_vs_model(sc, run_dir)
    measured = routing_from_run(run_dir, shape)
    assert len(measured.shares) == 2 and all(sum(s) == pytest.approx(1.0) for s in measured.shares)
    assert measured.shares != Routing.uniform(shape).shares
    mean_engine = sum(e for e, _ in pairs) / len(pairs)
    kw = dict(count_attention=False, memory_traffic=False)
    got = mean_pcmoe_step(shape, dep, 4, measured, 4, 16, **kw)["total_s"]
    uni = mean_pcmoe_step(shape, dep, 4, Routing.uniform(shape), 4, 16, **kw)["total_s"]
    print(f"mean step: engine {mean_engine:.6f} s, measured routing {got:.6f} s, uniform {uni:.6f} s")
    assert abs(got - mean_engine) / mean_engine < 0.10
    with pytest.raises(Exception, match="capture"):
        routing_from_run(run_dir / "nowhere", shape)


def test_exchange_queues_sends_on_the_uplink_and_replies_on_the_downlink():
    link = LinkCfg(up_mbps=8e-6, down_mbps=8e-6, latency_ms=500)    # 1 byte per second, 1 s latency
    dep = Deployment(A100, link, link)
    # sends serialize one after the other (2 s, then 3 s); host 0 ready at 2+1+4 = 7, host 1 at
    # 5+1+0 = 6: host 1's 5-byte reply goes first (6..11), host 0's waits (11..13); +1 s latency
    assert exchange_seconds(dep, [(2, 2, 4.0), (3, 5, 0.0)]) == pytest.approx(14.0)
    assert exchange_seconds(dep, []) == 0.0


def test_control_messages_are_the_codecs_frames():
    turn, done = control_bytes(12, "party-3", rnd=2)
    assert turn == len(codec.encode(Message(kind="turn", src="coordinator", dst="party-3", step=12,
                                            meta={"party": "party-3", "round": 2})))
    assert done == len(codec.encode(Message(kind="done", src="party-3", dst="coordinator", step=12)))


@pytest.fixture(scope="module")
def mixtral():
    return MoEShape.from_model(meta_model("mixtral-8x7b"))


def test_mixtral_uniform_step_bytes_and_flops_golden(mixtral):
    H, I, L, T = 4096, 14336, 32, 2048
    traffic, local = layer_traffic(mixtral, Routing.uniform(mixtral), 0, 4, T)
    assert local == L * 2 * 512                 # experts 0 and 4: 512 rows each per layer
    assert all(v == ([h, h + 4], [512, 512]) for layer in traffic.values() for h, v in layer.items())
    dep = Deployment(A100, links.PROFILES["wan"], links.PROFILES["datacenter"])
    r = pcmoe_step(mixtral, dep, 4, 0, traffic, local, 1, T, count_attention=False, memory_traffic=False)
    payload = L * 4 * 3 * 1024 * H * 2          # 4 messages per layer per remote host, 1024 rows each
    assert payload < r["bytes"] < payload * 1.0001 and r["messages"] == L * 4 * 3
    assert r["sequential_round_trips"] == 2 * L
    backbone = H * H * 2 + 2 * H * 1024 + H * 8
    assert r["flops"] == 3 * 2 * (T * L * backbone + local * 3 * H * I + T * H * 32000)
    assert r["owner_compute_s"] == pytest.approx(r["flops"] / 312e12, rel=1e-12)
    c = centralized_step(mixtral, A100, 1, T, count_attention=False, memory_traffic=False)
    assert c["flops"] == 3 * 2 * (T * L * (backbone + 2 * 3 * H * I) + T * H * 32000)
    # latency matters: each of the 2L sequential exchanges pays at least one round trip
    assert r["expert_fwd_s"] + r["expert_bwd_s"] > 2 * L * 2 * dep.latency(dep.party_link, dep.party_link)


def test_baselines_golden(mixtral):
    wan, dc = links.PROFILES["wan"], links.PROFILES["datacenter"]
    dep = Deployment(A100, wan, dc)
    c = centralized_step(mixtral, A100, 1, 512, count_attention=False, memory_traffic=False)
    f = fedavg_step(mixtral, dep, 4, 1, 512, local_steps=2, count_attention=False, memory_traffic=False)
    model = 46_702_792_704 * 2
    lat = dep.latency(wan, dc)
    assert f["round_s"] == pytest.approx(2 * c["total_s"] + 2 * (model * 8 / 100e6 + lat), rel=1e-12)
    assert f["total_s"] == pytest.approx(f["round_s"] / 8)
    s = split_step(mixtral, dep, 1, 512, cut=1, count_attention=False, memory_traffic=False)
    assert s["bytes"] == 2 * 512 * 4096 * 2 + 512 * 8
    assert s["flops"] == pytest.approx(c["flops"], rel=1e-12)     # the same work, split in two


def test_cli_table_json_sweeps_and_errors(tmp_path, capsys):
    assert cli.main(["steptime", "--model", "mixtral-8x7b", "--parties", "4", "--link", "wan",
                     "--device", "a100"]) == 0
    out = capsys.readouterr().out
    for label in ("centralized (1 device)", "PC-MoE", "FedAvg (2 local)", "split (cut 1)", "assumptions:",
                  "routing: uniform", "64 sequential exchanges", "x centralized"):
        assert label in out, label
    assert cli.main(["steptime", "--json", "--link", "5g", "--latency-ms", "0", "--jitter-ms", "0"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["results"]) == {"centralized", "pcmoe", "fedavg", "split"}
    assert doc["results"]["pcmoe"]["total_s"] > doc["results"]["centralized"]["total_s"]
    for sweep in ("latency", "bandwidth", "parties"):
        png = tmp_path / f"{sweep}.png"
        assert cli.main(["steptime", "--sweep", sweep, "-o", str(png)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert cli.main(["steptime", "--model", "llama-2-7b", "--link", "moon", "--batch", "0", "--sweep", "parties"]) == 2
    err = capsys.readouterr().err
    assert "--model: unknown MoE shape 'llama-2-7b'" in err and "--link: unknown profile 'moon'" in err
    assert "--batch: must be >= 1" in err and "--sweep: needs -o PATH" in err
    assert cli.main(["steptime", "--parties", "9"]) == 2
    assert "--parties: at most 8" in capsys.readouterr().err
