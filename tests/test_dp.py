"""Tests for DP-SGD through Opacus (parties/federated/dp.py) and its use by FedSGD and split learning."""
import json
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from parties import layers as L
from parties.base import RoleContext
from parties.data.dataset import prepare_data
from parties.federated.dp import dp_config, make_private, unsupported_layers
from parties.models import build_model
from testbed.errors import ConfigError
from testbed.run.runner import run_scenario
from testbed.scenario import DefenceCfg, ModelCfg, load_scenario

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "tokenizers"
# Opacus' hooks on the token embedding fire on outputs only (ids need no grad); expected
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
SMALL = dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=48, num_experts=4)


def run(tmp_path, path, **over):
    sc = load_scenario(REPO / "scenarios" / path, {"baselines": [], **over})
    return sc, *run_scenario(sc, runs_root=tmp_path, base_dir=REPO, cache_dir=CACHE, progress=False)


def test_epsilon_matches_the_rdp_accountant_golden_number():
    """sigma 1.1, q = 10/1000, 50 steps, delta 1e-5: Opacus' RDP accountant says 0.8956495..."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 2)
    cfg = DefenceCfg(type="dp_sgd", noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)
    pt = make_private(lin, torch.optim.SGD(lin.parameters(), lr=0.1), 1000, 10, cfg,
                      generator=torch.Generator().manual_seed(0))
    assert pt.epsilon() == 0.0
    for _ in range(50):
        lin(torch.randn(10, 4)).pow(2).mean().backward()
        pt.step()
        pt.zero_grad()
    ref = RDPAccountant()
    ref.history = [(1.1, 0.01, 50)]
    assert pt.steps == 50 and pt.sample_rate == 0.01
    assert pt.epsilon() == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-12)
    assert pt.epsilon() == pytest.approx(0.8956495434880198, rel=1e-9)
    assert pt.log_fields() == {"epsilon": pt.epsilon(), "noise_multiplier": 1.1, "max_grad_norm": 1.0,
                               "delta": 1e-5}


def test_transmitted_fedsgd_gradient_is_the_mean_of_clipped_per_sample_gradients(tmp_path):
    C = 0.05
    sc, path, _ = run(tmp_path, "fedsgd-tiny.yaml", training={"steps": 1, "eval_every": 5},
                      defences=[{"type": "dp_sgd", "noise_multiplier": 0.0, "max_grad_norm": C}])
    rec = next(json.loads(line) for line in open(path / "capture" / "index.jsonl")
               if '"kind": "grad"' in line and '"src": "party-0"' in line)
    f = load_file(str(path / "capture" / rec["file"]))
    sent = {n: f[t["key"]] for n, t in rec["tensors"].items()}
    ids = next(torch.tensor(r["input_ids"]) for r in map(json.loads, open(path / "truth" / "tokens.jsonl"))
               if r["party"] == "party-0" and r["step"] == 0)
    model = AutoModelForCausalLM.from_pretrained(path / "public" / "init-model")
    names = [n for n, _ in model.named_parameters()]
    clipped = []
    for i in range(len(ids)):
        model.zero_grad()
        model(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert g.norm() > 5 * C   # the bound was active for every example
        clipped.append(g * min(1.0, C / (g.norm().item() + 1e-6)))
    expect = torch.stack(clipped).mean(0)
    got = torch.cat([sent[n].reshape(-1) for n in names])
    assert got.norm() <= C + 1e-6
    assert torch.allclose(got, expect, atol=1e-7, rtol=1e-4)
    train = [json.loads(line) for line in open(path / "metrics.jsonl") if '"event": "train"' in line]
    assert train and all(r["epsilon"] is None and r["max_grad_norm"] == C and r["noise_multiplier"] == 0
                         for r in train)


def test_split_party_epsilon_per_step_follows_the_accountant(tmp_path):
    sc, path, summary = run(tmp_path, "split-tiny.yaml", training={"steps": 2, "eval_every": 5},
                      defences=[{"type": "dp_sgd", "noise_multiplier": 0.8, "max_grad_norm": 1.0, "delta": 1e-4}])
    rows = {p.name: len(p.train) for p in prepare_data(sc, REPO, CACHE).parties}
    train = [json.loads(line) for line in open(path / "metrics.jsonl") if '"event": "train"' in line]
    assert len(train) == 4
    for r in train:
        ref = RDPAccountant()
        ref.history = [(0.8, sc.training.batch_size / rows[r["party"]], r["step"] + 1)]
        assert r["epsilon"] == pytest.approx(ref.get_epsilon(delta=1e-4), rel=1e-12)
        assert (r["noise_multiplier"], r["max_grad_norm"], r["delta"]) == (0.8, 1.0, 1e-4)
    eps = [r["epsilon"] for r in sorted(train, key=lambda r: r["step"]) if r["party"] == "party-0"]
    assert eps[1] > eps[0] > 0
    mem = summary["protocols"]["split"]["memory"]
    assert mem["party-0"]["grads"] == (1 + sc.training.batch_size) * mem["party-0"]["params"]   # + per-sample
    assert mem["server"]["grads"] == mem["server"]["params"]                                   # not private


def test_moe_layers_are_refused_by_name():
    model = build_model(ModelCfg(family="mixtral", **SMALL), 64, 0)
    cfg = DefenceCfg(type="dp_sgd")
    with pytest.raises(ConfigError) as err:
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), 100, 4, cfg)
    text = str(err.value)
    assert "'model.layers.0.mlp.gate' (MixtralTopKRouter" in text
    assert "'model.layers.0.mlp.experts' (MixtralExperts: gate_up_proj [4, 96, 32]" in text
    assert "self_attn" not in text and "layernorm" not in text and len(err.value.problems) == 2
    # split learning's party side with the cut right after the embeddings is supported
    assert unsupported_layers(L.keep_only(model, embed=True)) == []
    dense = build_model(ModelCfg(family="llama", **SMALL), 64, 0)
    assert unsupported_layers(dense) == []


def test_dp_config_is_for_the_protocol_under_study_only():
    sc = load_scenario(REPO / "scenarios" / "fedsgd-tiny.yaml",
                       {"defences": [{"type": "noise", "sigma": 0.1}, {"type": "dp_sgd", "noise_multiplier": 2.0}]})

    def ctx(name, scenario=sc):
        return RoleContext(scenario=scenario, vocab_size=64, parties=[], device=torch.device("cpu"),
                           build_model=None, protocol_name=name)
    assert dp_config(ctx("fedsgd")).noise_multiplier == 2.0
    assert dp_config(ctx("centralized")) is None and dp_config(ctx("local")) is None
    two = load_scenario(REPO / "scenarios" / "fedsgd-tiny.yaml",
                        {"defences": [{"type": "dp_sgd"}, {"type": "dp_sgd"}]})
    with pytest.raises(ConfigError, match="only one dp_sgd entry is allowed"):
        dp_config(ctx("fedsgd", two))


def test_batch_larger_than_data_is_rejected():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="batch_size 8 must be in 1..data_size \\(4\\)"):
        make_private(lin, torch.optim.SGD(lin.parameters(), lr=0.1), 4, 8, DefenceCfg(type="dp_sgd"))
