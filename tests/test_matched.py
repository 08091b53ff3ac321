"""Fair baselines and ablations: token-matched and memory-matched local, PC-MoE without
cross-party expert training, FedAvg without averaging."""
import copy

import pytest
import torch

from parties.models import build_model
from parties.pcmoe.host import ExpertHost
from parties.pcmoe.meter import SavedBytes
from parties.pcmoe.sharding import shard_model
from parties.single_site.matched import restrict_experts
from testbed.engine.codec import Message
from testbed.engine.memory import MemoryTracker
from testbed.rundir import read_metrics

from conftest import tiny_scenario

PCMOE = dict(protocol={"name": "pcmoe"}, parties={"count": 2},
             baselines=["local_token_matched", "local_memory_matched", "pcmoe_no_sharing", "local"],
             training={"steps": 7, "eval_every": 2})


@pytest.fixture(scope="module")
def pcmoe_run(tmp_path_factory):
    from testbed.run.runner import run_scenario
    from conftest import ROOT
    tmp = tmp_path_factory.mktemp("matched")
    return run_scenario(tiny_scenario(**PCMOE), runs_root=tmp / "runs", base_dir=ROOT,
                        cache_dir=tmp / "cache", progress=False)


def test_token_matched_local_trains_each_party_on_the_protocols_tokens(pcmoe_run):
    _, s = pcmoe_run
    p = s["protocols"]
    assert p["local_token_matched"]["train_tokens"] == p["pcmoe"]["train_tokens"]
    assert p["local_memory_matched"]["train_tokens"] == p["pcmoe"]["train_tokens"]
    assert sum(p["pcmoe"]["train_tokens"].values()) == 7 * 2 * 16          # steps x batch x seq
    assert p["local"]["train_tokens"]["party-0"] == 7 * 2 * 16              # plain local: n times more
    for name in ("local_token_matched", "local_memory_matched", "pcmoe", "local"):
        assert p[name]["best_eval_loss"] <= p[name]["mean_eval_loss"]


def test_matched_locals_evaluate_as_often_as_the_protocol(pcmoe_run):
    path, _ = pcmoe_run
    evals = [r for r in read_metrics(path) if r.get("event") == "eval"]
    count = {n: sum(r["protocol"] == n and r["party"] == "party-0" for r in evals)
             for n in ("pcmoe", "local_token_matched")}
    assert count["pcmoe"] == 4 and count["local_token_matched"] >= 3       # steps 1,3,5,6 vs ~4 of 3-4


def test_memory_matched_holds_the_backbone_and_only_the_hosted_experts(pcmoe_run):
    _, s = pcmoe_run
    sc = tiny_scenario(**PCMOE)
    m, hidden, layers = sc.model, sc.model.hidden_size, sc.model.num_layers
    mm = s["protocols"]["local_memory_matched"]["memory"]["party-0"]["params"]
    pc = s["protocols"]["pcmoe"]["memory"]["party-0"]["params"]
    # PC-MoE keeps the whole router (E rows); the memory-matched party only its hosted rows
    assert pc - mm == layers * (m.num_experts - m.num_experts // 2) * hidden * 4
    full = s["protocols"]["local_token_matched"]["memory"]["party-0"]["params"]
    expert = (2 * m.intermediate_size * hidden + hidden * m.intermediate_size) * 4
    assert full - pc == layers * (m.num_experts // 2) * expert


def test_restrict_experts_to_all_is_the_same_model_and_slices_rows():
    sc = tiny_scenario()
    model = build_model(sc.model, 300, 0)
    ids = torch.randint(300, (2, 12), generator=torch.Generator().manual_seed(1))
    same = restrict_experts(model, list(range(sc.model.num_experts)))
    assert torch.allclose(same(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    small = restrict_experts(model, [1, 3])
    g0, gs = model.model.layers[0].mlp, small.model.layers[0].mlp
    assert torch.equal(gs.gate.weight, g0.gate.weight[[1, 3]])
    assert torch.equal(gs.experts.down_proj, g0.experts.down_proj[[1, 3]])
    assert small.config.num_local_experts == 2 and small.config.num_experts_per_tok == 2


def test_no_sharing_host_returns_the_same_input_gradient_but_never_trains_on_it():
    sc = tiny_scenario()
    outs = {}
    for train_remote in (True, False):
        model = build_model(sc.model, 300, 0)
        shards = shard_model(model, 1, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        tracker = MemoryTracker("party-1")
        tracker.attach([model], [opt])
        host = ExpertHost("party-1", shards, opt, tracker, SavedBytes([model]))
        host.train_remote = train_remote
        before = copy.deepcopy(shards[0].state_dict())
        h = torch.randn(5, sc.model.hidden_size, generator=torch.Generator().manual_seed(0))
        meta = {"layer": 0, "experts": [1, 3], "counts": [2, 3]}
        y = host.serve(Message("expert_fwd", src="party-0", step=0, meta=meta, tensors={"hidden": h}))
        g = host.serve(Message("expert_bwd", src="party-0", step=0, meta=meta,
                               tensors={"grad_output": torch.ones_like(y.tensors["output"])}))
        host.finalize()
        moved = any(not torch.equal(before[k], v) for k, v in shards[0].state_dict().items())
        outs[train_remote] = (g.tensors["grad_input"], moved)
    assert torch.allclose(outs[True][0], outs[False][0])
    assert outs[True][1] and not outs[False][1]


def test_fedavg_without_averaging_is_local_training_step_for_step(run_tiny):
    path, s = run_tiny(tiny_scenario(protocol={"name": "fedavg", "options": {"local_steps": 2}},
                                     baselines=["fedavg_no_avg", "local_token_matched"],
                                     training={"steps": 3, "eval_every": 1}))
    p = s["protocols"]
    assert p["fedavg_no_avg"]["eval_loss"] == pytest.approx(p["local_token_matched"]["eval_loss"], abs=1e-6)
    assert p["fedavg"]["eval_loss"]["party-0"] != pytest.approx(p["fedavg_no_avg"]["eval_loss"]["party-0"],
                                                                abs=1e-4)
    assert p["local_token_matched"]["train_tokens"]["party-0"] == 3 * 2 * 2 * 16   # rounds x local_steps x batch x seq


def test_flagship_scenario_compares_the_matched_baselines_over_three_seeds():
    from testbed.scenario import load_scenario
    from conftest import ROOT
    sc = load_scenario(ROOT / "scenarios" / "pcmoe-flagship.yaml")
    assert sc.protocol.name == "pcmoe" and sc.parties.count == 4 and len(sc.seeds) == 3
    assert sc.model.family == "mixtral" and sc.model.hidden_size >= 128 and sc.model.num_layers >= 4
    assert sc.model.num_experts == 8 and sc.init.pretrain is not None
    assert set(sc.baselines) == {"centralized", "local_token_matched", "local_memory_matched", "pcmoe_no_sharing"}
    assert sc.data.split.method != "iid"
