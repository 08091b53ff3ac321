"""Tests for FedSGD / FedAvg (parties/federated/)."""
import copy
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parties.base import RoleContext
from parties.data.dataset import prepare_data
from parties.models import build_model
from parties.registry import get_protocol
from testbed.engine import codec
from testbed.engine.codec import Message
from testbed.engine.sim import SimEngine
from testbed.errors import ConfigError
from testbed.engine.memory import MemoryTracker
from testbed.run.runner import endpoint_configs, run_scenario
from testbed.scenario import load_scenario

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "scenarios" / "fedsgd-tiny.yaml"
CACHE = REPO / ".cache" / "tokenizers"


def scenario(**over):
    over.setdefault("baselines", [])
    return load_scenario(TINY, over)


def run_roles(name, sc, data, init):
    """Run one protocol's roles in the SimEngine; return (log records, models built, engine)."""
    models = []

    def build():
        models.append(copy.deepcopy(init))
        return models[-1]

    ctx = RoleContext(scenario=sc, vocab_size=data.vocab_size, parties=data.parties, device=torch.device("cpu"),
                      build_model=build, protocol_name=name)
    proto = get_protocol(name)(ctx)
    ctx.trackers = {r: MemoryTracker(r) for r in proto.role_names()}
    logs = []
    engine = SimEngine(name, endpoint_configs(sc, proto.role_names()), random.Random(0), on_log=logs.append,
                       compute_mode="none")
    engine.run(proto.roles())
    return logs, models, engine


def losses(logs):
    return [r["loss"] for r in logs if r.get("event") == "train"]


def test_fedsgd_one_party_equals_centralized_sgd_step_for_step():
    sc = scenario(parties={"count": 1}, protocol={"name": "fedsgd"},
                  training={"steps": 4, "optimizer": "sgd", "lr": 0.05, "batch_size": 2, "eval_every": 2})
    data = prepare_data(sc, REPO, CACHE)
    data.parties[0].train = data.parties[0].train[:1]   # the party's training set is the batch
    init = build_model(sc.model, data.vocab_size, sc.seed)
    fed_logs, fed_models, _ = run_roles("fedsgd", sc, data, init)
    cen_logs, cen_models, _ = run_roles("centralized", sc, data, init)
    assert len(losses(fed_logs)) == 4
    assert losses(fed_logs) == pytest.approx(losses(cen_logs), rel=0, abs=1e-6)
    assert losses(fed_logs)[-1] < losses(fed_logs)[0] - 0.01    # it did learn
    for (n, a), (_, b) in zip(fed_models[0].named_parameters(), cen_models[0].named_parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), n
    assert not torch.equal(fed_models[0].lm_head.weight, init.lm_head.weight)
    fed_eval = [r["eval_loss"] for r in fed_logs if r.get("event") == "eval"]
    cen_eval = [r["eval_loss"] for r in cen_logs if r.get("event") == "eval"]
    assert fed_eval == pytest.approx(cen_eval, abs=1e-5)


@pytest.mark.parametrize("name,options", [("fedsgd", {"clients_per_round": 1}),
                                          ("fedavg", {"clients_per_round": 2, "local_steps": 2})])
def test_sampled_rounds_keep_every_copy_equal(name, options):
    sc = scenario(parties={"count": 3}, protocol={"name": name, "options": options},
                  training={"steps": 3, "eval_every": 10})
    data = prepare_data(sc, REPO, CACHE)
    init = build_model(sc.model, data.vocab_size, sc.seed)
    logs, models, engine = run_roles(name, sc, data, init)
    k = options["clients_per_round"]
    assert len(losses(logs)) == 3 * k
    rounds = [(t, dst) for t, src, dst, _, kind in engine.trace if kind == "round"]
    assert len(rounds) == 3 * k
    for a in models[1:]:
        for (n, p), (_, q) in zip(models[0].named_parameters(), a.named_parameters()):
            assert torch.equal(p, q), n
    assert not torch.equal(models[0].lm_head.weight, init.lm_head.weight)
    updates = [x for x in engine.trace if x[4] == "update"]
    assert len(updates) == 3 * 3   # every party gets every round's average


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory):
    sc = scenario(protocol={"name": "fedavg", "options": {"local_steps": 3}}, training={"steps": 2, "eval_every": 2})
    path, summary = run_scenario(sc, runs_root=tmp_path_factory.mktemp("fedavg"), base_dir=REPO, cache_dir=CACHE,
                                 progress=False)
    return sc, path, summary


def _index(path):
    return [json.loads(line) for line in open(path / "capture" / "index.jsonl")]


def _tensors(path, rec):
    f = load_file(str(path / "capture" / rec["file"]))
    return {n: f[t["key"]] for n, t in rec["tensors"].items()}


def test_fedavg_broadcast_is_the_sample_weighted_mean_of_deltas(fedavg_run):
    sc, path, _ = fedavg_run
    recs = _index(path)
    deltas = [r for r in recs if r["kind"] == "delta" and r["step"] == 0]
    update = next(r for r in recs if r["kind"] == "update" and r["step"] == 0)
    assert sorted(r["src"] for r in deltas) == ["party-0", "party-1"]
    partition = json.load(open(path / "truth" / "partition.json"))
    for r in deltas:
        assert r["meta"]["party"] == r["src"] and r["meta"]["local_steps"] == 3
        assert r["meta"]["n_samples"] > 0 and r["meta"]["round"] == 0
        assert r["src"] in partition
    w = [r["meta"]["n_samples"] for r in sorted(deltas, key=lambda r: r["src"])]
    assert w[0] != w[1]   # the weighting matters for this check
    got = _tensors(path, update)
    parts = [_tensors(path, r) for r in sorted(deltas, key=lambda r: r["src"])]
    for name, t in got.items():
        mean = parts[0][name] * (w[0] / sum(w)) + parts[1][name] * (w[1] / sum(w))
        assert torch.allclose(t, mean, atol=1e-7, rtol=0), name
    assert update["meta"]["n_samples"] == sum(w) and update["meta"]["payload"] == "mean_delta"
    tokens = [json.loads(line) for line in open(path / "truth" / "tokens.jsonl")]
    assert {(r["party"], r["step"]) for r in tokens} == {(p, s) for p in ("party-0", "party-1") for s in (0, 1)}
    assert all(len(r["input_ids"]) == 3 * sc.training.batch_size for r in tokens)   # the round's 3 batches


def test_update_bytes_are_the_parameters_plus_header(fedavg_run):
    sc, path, summary = fedavg_run
    init = build_model(sc.model, 512, sc.seed)
    n_params = sum(p.numel() for p in init.parameters())
    for r in _index(path):
        body = 4 * n_params if r["kind"] in ("delta", "update") else 0
        assert r["bytes"] == r["header_bytes"] + body
        assert set(r["tensors"]) == (set(dict(init.named_parameters())) if body else set())
    head = codec.encode(Message("round", src="coordinator", dst="party-0", step=0,
                                meta={"round": 0, "selected": ["party-0", "party-1"]}))
    first = _index(path)[0]
    assert first["kind"] == "round" and first["bytes"] == len(head)
    assert summary["protocols"]["fedavg"]["mean_eval_loss"] is not None


@pytest.mark.parametrize("name,options,match", [
    ("fedavg", {"local_steps": 0}, "local_steps: must be an integer >= 1 \\(got 0\\)"),
    ("fedavg", {"clients_per_round": 3}, "clients_per_round: must be 'all' or an integer in 1..2"),
    ("fedsgd", {"local_steps": 2}, "local_steps: unknown option; valid: clients_per_round"),
    ("fedsgd", {"clients_per_round": True}, "clients_per_round"),
])
def test_bad_options_are_config_errors(name, options, match):
    sc = scenario(protocol={"name": name, "options": options})
    ctx = RoleContext(scenario=sc, vocab_size=512, parties=[None, None], device=torch.device("cpu"),
                      build_model=None, protocol_name=name)
    with pytest.raises(ConfigError, match=match) as err:
        get_protocol(name)(ctx)
    assert err.value.path == "protocol.options"


@pytest.mark.parametrize("name,protocol,count", [
    ("fedavg-4party", "fedavg", 4), ("fedsgd-4party", "fedsgd", 4), ("split-4party", "split", 4),
    ("dp-fedavg-4party", "fedavg", 4), ("fedsgd-tiny", "fedsgd", 2), ("split-tiny", "split", 2)])
def test_baseline_scenarios_validate(name, protocol, count):
    sc = load_scenario(REPO / "scenarios" / f"{name}.yaml")
    assert (sc.name, sc.protocol.name, sc.parties.count) == (name, protocol, count)
    assert sc.baselines == ["centralized", "local"]
    assert [d.type for d in sc.defences] == (["dp_sgd"] if name.startswith("dp-") else [])
    if name.endswith("tiny"):   # DAGER's regime: batch x seq_len below the hidden size
        assert sc.training.batch_size * sc.training.seq_len < sc.model.hidden_size
