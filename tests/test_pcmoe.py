"""Tests for the PC-MoE protocol (parties/pcmoe/).

Exactness: one party reproduces ``centralized`` step for step; with several parties
the routed forward gives the unsplit model's logits and the staged backward its
gradients; bytes on the wire follow the codec formula.  Tiny models only.
"""
import copy
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from parties.base import RoleContext
from parties.data.dataset import PartyData
from parties.models import build_model
from parties.pcmoe.sharding import ExpertShard, hosted_experts, route, shard_model
from parties.pcmoe.protocol import PCMoE, validate_options
from parties.pcmoe.host import BWD, EVAL_FWD, FWD, GRAD_IN, OUT, ExpertHost
from testbed.engine import codec
from testbed.engine.codec import Message
from testbed.engine.effects import Send
from testbed.engine.sim import SimEngine
from testbed.errors import ConfigError, ProtocolError
from testbed.engine.memory import MemoryTracker
from testbed.run.runner import endpoint_configs, run_scenario
from testbed.scenario import deep_merge, load_scenario, parse_scenario

VOCAB, SEQ, BATCH = 64, 8, 2
EXPERT_KINDS = {FWD, OUT, BWD, GRAD_IN, EVAL_FWD, "eval_expert_out"}


def tiny_scenario(n, family="mixtral", **over):
    data = {"name": "t", "seed": 3,
            "model": {"family": family, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                      "num_kv_heads": 2, "intermediate_size": 48, "num_experts": 4, "top_k": 2},
            "protocol": {"name": "pcmoe"}, "parties": {"count": n},
            "training": {"steps": 2, "batch_size": BATCH, "seq_len": SEQ, "eval_every": 1,
                         "eval_batches": 1},
            "capture": {"enabled": False}}
    return parse_scenario(deep_merge(data, over))


def make_protocol(sc):
    """A PCMoE protocol over random token data, built as the runner builds it."""
    g = torch.Generator().manual_seed(1)
    parties = [PartyData(f"party-{i}", train=torch.randint(2, VOCAB, (6, SEQ), generator=g),
                         eval=torch.randint(2, VOCAB, (BATCH, SEQ), generator=g))
               for i in range(sc.parties.count)]
    init = build_model(sc.model, VOCAB, sc.seed)
    ctx = RoleContext(scenario=sc, vocab_size=VOCAB, parties=parties, device=torch.device("cpu"),
                      build_model=lambda: copy.deepcopy(init), protocol_name="pcmoe")
    proto = PCMoE(ctx)
    ctx.trackers = {r: MemoryTracker(r) for r in proto.role_names()}
    return proto, init


def drive(sc, proto, states, probe):
    """Run ``probe(state0)`` as party-0 while the other parties serve, then stop them."""
    n = sc.parties.count

    def party0():
        yield from probe(states[0])
        for j in range(1, n):
            yield Send(f"party-{j}", Message(kind="stop"))

    roles = {"party-0": party0(), **{f"party-{j}": proto.party(j, states[j]) for j in range(1, n)}}
    SimEngine("pcmoe", endpoint_configs(sc, list(roles)), random.Random(0)).run(roles)


def batch_ids(seed=5):
    return torch.randint(2, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


# ---- options and sharding ------------------------------------------------------------

def test_options_unknown_keys_and_bad_values_are_listed():
    assert validate_options({}) == {"noise_sigma": 0.0, "expert_training": "all", "shuffle_rows": False,
                                    "dedup_rows": False, "pad_counts": 0, "eval_traffic": "plain"}
    with pytest.raises(ConfigError) as err:
        validate_options({"noise_sigma": -1, "sigma": 1, "experts": 2, "expert_training": "none"})
    text = str(err.value)
    assert "protocol.options" in text and "experts: unknown option" in text and "sigma: unknown" in text
    assert "noise_sigma: must be a number >= 0 (got -1)" in text
    assert "expert_training: must be 'all' or 'own' (got 'none')" in text
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        make_protocol(tiny_scenario(2, family="llama"))


def test_shard_keeps_only_hosted_experts_and_computes_like_the_original():
    sc = tiny_scenario(3)
    full = build_model(sc.model, VOCAB, 0)
    model = copy.deepcopy(full)
    shards = shard_model(model, 0, 3)
    assert hosted_experts(4, 0, 3) == [0, 3] and hosted_experts(4, 2, 3) == [2]
    ref = full.model.layers[1].mlp.experts
    shard = shards[1]
    assert isinstance(model.model.layers[1].mlp.experts, ExpertShard)
    assert shard.gate_up_proj.shape == (2, 96, 32) and shard.down_proj.shape == (2, 32, 48)
    n_full = sum(p.numel() for p in full.parameters())
    n_party = sum(p.numel() for p in model.parameters())
    assert n_full - n_party == 2 * 2 * (96 * 32 + 32 * 48)  # 2 layers x 2 experts dropped
    x = torch.randn(5, 32)
    idx = torch.tensor([[3, 0]] * 5)
    expect = ref(x, idx, torch.tensor([[1.0, 0.0]] * 5))  # weight 1 on expert 3 only
    torch.testing.assert_close(shard(3, x), expect, rtol=1e-5, atol=1e-6)
    plan = route(torch.tensor([[1, 3], [3, 0], [1, 0]]), 4)
    assert [(e, t.tolist(), k.tolist()) for e, t, k in plan] == [
        (0, [1, 2], [1, 1]), (1, [0, 2], [0, 0]), (3, [1, 0], [0, 1])]


# ---- exactness -----------------------------------------------------------------------

def test_one_party_reproduces_centralized_step_for_step(tmp_path):
    sc = load_scenario("scenarios/pcmoe-tiny.yaml", {
        "parties": {"count": 1}, "baselines": ["centralized"], "capture": {"enabled": False},
        "training": {"steps": 4, "eval_every": 2}})
    path, _ = run_scenario(sc, runs_root=tmp_path, progress=False, cache_dir=None)
    recs = [json.loads(line) for line in open(path / "metrics.jsonl")]

    def series(proto, event, key):
        return [(r["step"], r[key]) for r in recs if r.get("protocol") == proto and r.get("event") == event]

    for event, key in (("train", "loss"), ("eval", "eval_loss")):
        got, want = series("pcmoe", event, key), series("centralized", event, key)
        assert [s for s, _ in got] == [s for s, _ in want] and len(got) == (4 if event == "train" else 2)
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("family,n", [("mixtral", 2), ("mixtral", 3), ("olmoe", 3), ("qwen2_moe", 2)])
def test_routed_forward_equals_unsplit_model(family, n):
    sc = tiny_scenario(n, family=family)
    proto, init = make_protocol(sc)
    states = [proto.make_party(i) for i in range(n)]
    ids, out = batch_ids(), {}

    def probe(st):
        p = yield from st.owner.forward(ids, 0, train=False)
        out["logits"], out["remote"] = p.logits, p.remote_pairs

    drive(sc, proto, states, probe)
    with torch.no_grad():
        want = init(input_ids=ids).logits
    assert out["remote"] > 0
    torch.testing.assert_close(out["logits"], want, rtol=1e-4, atol=1e-5)


def test_staged_backward_gives_the_unsplit_gradients():
    n = 3
    sc = tiny_scenario(n)
    proto, init = make_protocol(sc)
    states = [proto.make_party(i) for i in range(n)]
    ids, got = batch_ids(7), {}

    def probe(st):
        p = yield from st.owner.forward(ids, 0, train=True)
        got["loss"] = yield from st.owner.backward(p, ids, 0)
        got["grads"] = {name: None if prm.grad is None else prm.grad.clone()
                        for name, prm in st.model.named_parameters()}
        got["experts"] = {(j, layer): {k: None if prm.grad is None else prm.grad.clone()
                                       for k, prm in shard.named_parameters()}
                          for j, s in enumerate(states) for layer, shard in s.shards.items()}

    drive(sc, proto, states, probe)
    ref = copy.deepcopy(init)
    loss = ref(input_ids=ids, labels=ids).loss
    loss.backward()
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    checked = 0
    for name, prm in ref.named_parameters():
        if ".mlp.experts." not in name:
            torch.testing.assert_close(got["grads"][name], prm.grad, rtol=1e-4, atol=1e-6)
            continue
        layer, proj = int(name.split(".")[2]), name.rsplit(".", 1)[1]
        for e in range(4):
            j = e % n
            g = got["experts"][(j, layer)][proj]
            slot = states[j].shards[layer].hosted.index(e)
            torch.testing.assert_close(torch.zeros_like(prm.grad[e]) if g is None else g[slot],
                                       prm.grad[e], rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked == 2 * 2 * 4  # layers x projections x experts


# ---- wire: bytes, meta, capture ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    sc = load_scenario("scenarios/pcmoe-tiny.yaml", {"training": {"steps": 3, "eval_every": 3}})
    path, summary = run_scenario(sc, runs_root=tmp_path_factory.mktemp("runs"), progress=False,
                                 cache_dir=None)
    index = [json.loads(line) for line in open(path / "capture" / "index.jsonl")]
    metrics = [json.loads(line) for line in open(path / "metrics.jsonl")]
    return sc, path, summary, index, metrics


def framed_size(line, dtype_size=4):
    """4-byte length + the codec's header (testbed.engine.codec.build_header) + raw tensor bytes."""
    specs, offset = [], 0
    for name, t in line["tensors"].items():
        specs.append((name, t["dtype"], t["shape"]))
        offset += dtype_size * math.prod(t["shape"])
    header = codec.build_header(line["kind"], line["src"], line["dst"], line["step"], line["meta"], specs)
    return 4 + len(header) + offset, 4 + len(header)


def test_bytes_per_message_and_per_step_follow_the_formula(tiny_run):
    sc, _, summary, index, metrics = tiny_run
    hidden = sc.model.hidden_size
    expert_msgs = [m for m in index if m["kind"] in EXPERT_KINDS]
    assert expert_msgs
    for m in expert_msgs:
        (name, t), = m["tensors"].items()
        rows = sum(m["meta"]["counts"])
        assert t["shape"] == [rows, hidden] and t["dtype"] == "float32"
        size, header = framed_size(m)
        assert (m["bytes"], m["header_bytes"]) == (size, header)
        assert m["bytes"] == m["header_bytes"] + rows * hidden * 4
        probe = Message(kind=m["kind"], src=m["src"], dst=m["dst"], step=m["step"], meta=m["meta"],
                        tensors={name: torch.zeros(rows, hidden)})
        assert len(codec.encode(probe)) == m["bytes"]
    trains = [r for r in metrics if r.get("event") == "train" and r["protocol"] == "pcmoe"]
    assert len(trains) == 3
    pairs_per_step = sc.training.batch_size * sc.training.seq_len * sc.model.top_k * sc.model.num_layers
    for r in trains:
        assert r["local_pairs"] + r["remote_pairs"] == pairs_per_step
        step_msgs = [m for m in index if m["step"] == r["step"] and m["kind"] in (FWD, OUT, BWD, GRAD_IN)]
        for kind in (FWD, OUT, BWD, GRAD_IN):
            of_kind = [m for m in step_msgs if m["kind"] == kind]
            assert sum(m["bytes"] for m in of_kind) == \
                sum(m["header_bytes"] for m in of_kind) + r["remote_pairs"] * hidden * 4
    assert summary["protocols"]["pcmoe"]["bytes"] == sum(m["bytes"] for m in index)
    assert summary["protocols"]["pcmoe"]["messages"] == len(index)


def test_capture_names_layer_experts_origin_and_host(tiny_run):
    sc, path, _, index, _ = tiny_run
    direction = {FWD: "fwd", OUT: "fwd_out", BWD: "bwd", GRAD_IN: "bwd_out", EVAL_FWD: "fwd",
                 "eval_expert_out": "fwd_out"}
    msgs = [m for m in index if m["kind"] in EXPERT_KINDS]
    for m in msgs:
        meta = m["meta"]
        assert meta["direction"] == direction[m["kind"]]
        to_host = meta["direction"] in ("fwd", "bwd")
        assert (m["src"], m["dst"]) == ((meta["origin"], meta["host"]) if to_host
                                        else (meta["host"], meta["origin"]))
        assert meta["origin"] != meta["host"] and 0 <= meta["layer"] < sc.model.num_layers
        assert all(e % 2 == int(meta["host"].split("-")[1]) for e in meta["experts"])
        assert len(meta["counts"]) == len(meta["experts"]) and min(meta["counts"]) > 0
        (name, t), = m["tensors"].items()
        stored = load_file(str(path / "capture" / m["file"]))[t["key"]]
        assert list(stored.shape) == t["shape"]
    by_kind = {k: sum(1 for m in msgs if m["kind"] == k) for k in direction}
    assert by_kind[FWD] == by_kind[OUT] == by_kind[BWD] == by_kind[GRAD_IN] > 0
    assert by_kind[EVAL_FWD] == by_kind["eval_expert_out"] > 0


def test_noise_sigma_perturbs_what_is_sent(tmp_path):
    sent = {}
    for sigma in (0.0, 0.5):
        sc = load_scenario("scenarios/pcmoe-tiny.yaml", {
            "training": {"steps": 1}, "protocol": {"options": {"noise_sigma": sigma}}})
        path, _ = run_scenario(sc, runs_root=tmp_path, progress=False, cache_dir=None, run_name=f"s{sigma}")
        first = next(json.loads(line) for line in open(path / "capture" / "index.jsonl")
                     if json.loads(line)["kind"] == FWD)
        sent[sigma] = load_file(str(path / "capture" / first["file"]))[first["tensors"]["hidden"]["key"]]
    diff = sent[0.5] - sent[0.0]
    assert diff.abs().max() > 0 and 0.4 < diff.std().item() < 0.6


# ---- host contract -------------------------------------------------------------------

def test_host_rejects_foreign_experts_and_unmatched_backward():
    sc = tiny_scenario(2)
    proto, _ = make_protocol(sc)
    st = proto.make_party(1)
    assert st.shards[0].hosted == [1, 3]
    meta = {"layer": 0, "experts": [0], "counts": [2], "origin": "party-0", "host": "party-1",
            "direction": "fwd", "phase": "train"}
    with pytest.raises(ProtocolError, match=r"experts \[0\].*hosts \[1, 3\]"):
        st.host.serve(Message(kind=FWD, src="party-0", step=0, meta=meta, tensors={"hidden": torch.zeros(2, 32)}))
    meta.update(experts=[1], counts=[3])
    with pytest.raises(ProtocolError, match="does not match counts"):
        st.host.serve(Message(kind=FWD, src="party-0", step=0, meta=meta, tensors={"hidden": torch.zeros(2, 32)}))
    meta.update(counts=[2], direction="bwd")
    with pytest.raises(ProtocolError, match="without a matching forward"):
        st.host.serve(Message(kind=BWD, src="party-0", step=0, meta=meta,
                              tensors={"grad_output": torch.zeros(2, 32)}))
    assert isinstance(st.host, ExpertHost)
