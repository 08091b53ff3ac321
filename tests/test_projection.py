"""Tests for the memory projection (parties/shapes.py, testbed/costs/projection.py, the CLI).

Golden numbers: the published parameter counts of Mixtral-8x7B and LLaMA-2-7B, and
the projection's byte arithmetic from them.  Models live on the meta device only.
"""
import json
import math

import pytest
import torch

from parties.models import build_model
from parties.shapes import SHAPES, meta_model
from testbed import cli
from testbed.engine.memory import MemoryTracker
from testbed.costs.projection import hosted_max, model_stats, project
from testbed.scenario import ModelCfg

MIXTRAL_TOTAL = 46_702_792_704            # Mixtral-8x7B
MIXTRAL_EXPERTS = 32 * 8 * 3 * 4096 * 14336
LLAMA2_7B_TOTAL = 6_738_415_616


@pytest.fixture(scope="module")
def mixtral():
    return meta_model("mixtral-8x7b")


def test_meta_models_have_the_published_sizes_and_no_storage(mixtral):
    assert all(p.device.type == "meta" for p in mixtral.parameters())
    st = model_stats(mixtral)
    assert st.total_params == MIXTRAL_TOTAL
    assert st.expert_params == MIXTRAL_EXPERTS
    assert (st.num_experts, st.top_k, st.expert_intermediate, st.moe_layers) == (8, 2, 14336, 32)
    llama = model_stats(meta_model("llama-2-7b"))
    assert llama.total_params == LLAMA2_7B_TOTAL and llama.expert_params == 0
    assert llama.dense_intermediate == 11008
    with pytest.raises(ValueError, match="valid: mixtral-8x7b"):
        meta_model("gpt-5")


def test_state_bytes_follow_from_the_parameter_split(mixtral):
    r = project(mixtral, parties=4, batch=1, seq_len=2048, dtype="bfloat16")
    backbone = MIXTRAL_TOTAL - MIXTRAL_EXPERTS
    party_params = backbone + MIXTRAL_EXPERTS // 4          # 2 of 8 experts per layer
    assert r["params"]["party"] == party_params
    assert r["centralized"]["params"] == r["centralized"]["grads"] == 2 * MIXTRAL_TOTAL
    assert r["centralized"]["optimizer"] == 4 * MIXTRAL_TOTAL
    assert r["party"]["params"] == 2 * party_params and r["party"]["optimizer"] == 4 * party_params
    assert r["party"]["activations"] < r["centralized"]["activations"]
    assert 0.65 < r["reduction"] < 0.75                      # the paper reports near 70%
    fp32_moments = project(mixtral, 4, 1, 2048, "bfloat16", optimizer_dtype="float32")
    assert fp32_moments["party"]["optimizer"] == 8 * party_params
    assert hosted_max(8, 3) == 3 and hosted_max(60, 4) == 15 and hosted_max(8, 16) == 1


def test_more_parties_save_more_and_dense_models_save_nothing(mixtral):
    reductions = [project(mixtral, n, 1, 512)["reduction"] for n in (1, 2, 4, 8)]
    assert reductions[0] == pytest.approx(0.0, abs=1e-12)
    assert reductions == sorted(reductions)
    dense = project(meta_model("llama-2-7b"), 4, 1, 512)
    assert dense["reduction"] == 0 and dense["party"] == dense["centralized"]
    with pytest.raises(ValueError, match="dtype"):
        project(mixtral, 4, 1, 512, dtype="int4")
    with pytest.raises(ValueError, match="parties"):
        project(mixtral, 0, 1, 512)


def test_activation_model_matches_what_the_testbed_measures():
    """The analytic activations of a tiny float32 Mixtral agree with the tracker's
    measurement of a real forward pass (saved-for-backward tensors) within 10%."""
    cfg = ModelCfg(family="mixtral", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=256, num_experts=8, top_k=2)
    model = build_model(cfg, 512, 0)
    tracker = MemoryTracker("site")
    tracker.attach([model])
    ids = torch.randint(2, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    with tracker.activations_scope():
        model(input_ids=ids, labels=ids).loss
    r = project(model, 4, 8, 32, dtype="float32")  # the projection only reads shapes
    assert r["centralized"]["params"] == tracker.params
    assert math.isclose(r["centralized"]["activations"], tracker.activations, rel_tol=0.10)


def test_cli_prints_every_shape_and_rejects_bad_arguments(capsys):
    assert cli.main(["memory", "--model", "all", "--parties", "4", "--batch", "2", "--seq-len", "256",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == set(SHAPES)
    assert out["mixtral-8x7b"]["params"]["total"] == MIXTRAL_TOTAL
    assert out["llama-2-7b"]["reduction"] == 0
    assert all(out[n]["reduction"] > 0.5 for n in ("mixtral-8x7b", "olmoe-1b-7b", "qwen1.5-moe-a2.7b"))
    assert cli.main(["memory", "--model", "olmoe-1b-7b"]) == 0
    text = capsys.readouterr().out
    assert "olmoe-1b-7b: 6.92 B parameters" in text and "reduction per party vs centralized" in text
    assert cli.main(["memory", "--model", "gpt-5", "--parties", "0", "--dtype", "int4"]) == 2
    err = capsys.readouterr().err
    assert "--model: unknown model shape 'gpt-5'" in err and "--parties: must be >= 1" in err
    assert "--dtype: unknown dtype 'int4'" in err


def test_cli_prints_every_assumption_in_full(capsys):
    from testbed.costs.projection import assumption_lines
    lines = assumption_lines()
    assert len(lines) == 4 and lines[0].startswith("Parameters and gradients in dtype")
    assert cli.main(["memory", "--model", "mixtral-8x7b", "--parties", "3", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "see testbed" not in out and "3 parties, batch 2 x seq 2048" in out
    for line in lines:
        assert f"  - {line}\n" in out
    assert cli.main(["memory", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mixtral-8x7b"]["assumption_lines"] == lines
