"""Tests for parties.layers: running a HF decoder LM piece by piece reproduces it exactly."""
import pytest
import torch

from parties import layers as L
from parties.models import build_model
from testbed.scenario import ModelCfg

FAMILIES = ["llama", "mixtral", "olmoe", "qwen2_moe"]


def tiny(family, layers=3):
    return build_model(ModelCfg(family=family, hidden_size=32, num_layers=layers, num_heads=4, num_kv_heads=2,
                                intermediate_size=48, num_experts=4, top_k=2), 96, seed=3)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_pieces_reproduce_full_logits_bit_for_bit(family, ids):
    model = tiny(family)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        assert torch.equal(L.run_all(model, ids), full)
        for cut in range(L.num_layers(model) + 1):   # every cut point, positions recomputed per side
            h = L.run_blocks(model, L.run_embed(model, ids), 0, cut)
            assert torch.equal(L.run_head(model, L.run_blocks(model, h, cut, L.num_layers(model))), full)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_loss_with_router_aux_equals_hf_loss(family, ids):
    model = tiny(family)
    logits_list = []
    logits = L.run_all(model, ids, router_logits=logits_list)
    loss = L.causal_lm_loss(logits, ids) + L.aux_loss(model, logits_list)
    ref = model(input_ids=ids, labels=ids).loss
    assert len(logits_list) == (3 if family == "mixtral" else 0)
    assert torch.allclose(loss, ref, rtol=0, atol=1e-6)
    if family == "mixtral":
        assert logits_list[0].shape == (ids.numel(), 4)
        assert L.aux_loss(model, logits_list).item() > 0


def test_keep_only_drops_parts_and_keeps_global_indices(ids):
    full = tiny("llama")
    party = L.keep_only(tiny("llama"), embed=True, blocks=range(1))
    server = L.keep_only(tiny("llama"), blocks=range(1, 3), head=True)
    names_p = {n for n, _ in party.named_parameters()}
    names_s = {n for n, _ in server.named_parameters()}
    assert names_p and names_s and not names_p & names_s
    assert names_p | names_s == {n for n, _ in full.named_parameters()}
    assert all(n.startswith(("model.embed_tokens", "model.layers.0.")) for n in names_p)
    assert "lm_head.weight" in names_s and "model.norm.weight" in names_s
    with torch.no_grad():
        h = L.run_blocks(party, L.run_embed(party, ids), 0, 1)
        out = L.run_head(server, L.run_blocks(server, h, 1, 3))
        assert torch.equal(out, full(input_ids=ids).logits)


def test_run_blocks_rejects_bad_ranges(ids):
    model = tiny("llama")
    h = L.run_embed(model, ids)
    with pytest.raises(ValueError, match="start=2, end=1"):
        L.run_blocks(model, h, 2, 1)
    with pytest.raises(ValueError, match="end <= 3"):
        L.run_blocks(model, h, 0, 4)
    assert L.run_blocks(model, h, 1, 1) is h
