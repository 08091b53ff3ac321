"""Gradient-inversion attacks on real FedSGD traffic: bag-of-tokens, DAGER, TAG.

The end-to-end tests attack a real run of scenarios/fedsgd-tiny.yaml (2 rounds: the
step-1 gradients are taken at weights the coordinator rebuilds by replaying its own
broadcast updates).  DAGER's architecture paths (second layer's q/k/v; one-layer dense
MLP; one-layer mixture of experts) are also checked directly on gradients computed the
way a fedsgd party computes them.
"""
import json
from pathlib import Path

import pytest
import torch

from attacks.bag_of_tokens import GradientBatch, token_bag
from attacks.dager import Dager, attacker_copy, numerical_rank, sequence_probe
from attacks.registry import get_attack
from attacks.runner import run_attacks
from attacks.score import Scorer
from attacks.tag import GradientDistance, lamp_reorder, optimise, second_order_copy
from attacks.view import AdversaryView
from parties.base import lm_loss
from parties.models import build_model
from testbed.scenario import ModelCfg


@pytest.fixture(scope="module")
def run(fedsgd_tiny_run):
    return fedsgd_tiny_run


@pytest.fixture(scope="module")
def truth(run):
    with open(run / "truth" / "tokens.jsonl") as f:
        return {(r["party"], r["step"]): r["input_ids"] for r in map(json.loads, f)}


def test_bag_of_tokens_is_the_exact_token_set(run, truth):
    attack = get_attack("bag-of-tokens")
    recs = attack.run(AdversaryView(run, "coordinator"), **attack.resolve_options({}))
    assert sorted((r.party, r.step) for r in recs) == sorted(truth)
    for r in recs:
        rows = torch.tensor(truth[(r.party, r.step)])
        # every token that reaches the loss; the last one of a row does not (causal LM)
        assert set(r.token_ids) == set(rows[:, :-1].flatten().tolist())
    summary, _ = Scorer(run).score(recs)
    assert summary["token_set_precision"] == 1.0
    assert 0.8 < summary["token_set_recall"] <= 1.0


@pytest.fixture(scope="module")
def dager(run):
    [res] = run_attacks(run, ["dager"])
    return res


def test_dager_recovers_every_sequence_exactly(run, truth, dager):
    res = dager
    assert res["status"] == "ok" and res["notes"] == []
    scores = res["scores"]
    assert scores["batches"] == len(truth) == 4
    assert scores["rows"] == 8
    assert scores["exact_match"] >= 0.95
    got = sorted((r["party"], r["step"], tuple(r["token_ids"])) for r in res["reconstructions"])
    want = sorted((p, s, tuple(row)) for (p, s), rows in truth.items() for row in rows)
    assert got == want
    saved = json.loads(Path(res["path"]).read_text())
    assert saved["scores"] == scores and len(saved["reconstructions"]) == 8


def test_planted_canaries_are_on_the_wire_and_dager_recovers_them(run, dager):
    """Every canary a party trains on opens its first batch (step 0, which every attack
    covers); truth marks the row and token positions; DAGER, exact, recovers each."""
    canaries = json.loads((run / "truth" / "canaries.json").read_text())
    planted = {(p["party"], p["row"], c["id"]) for c in canaries for p in c["planted"]}
    assert len(planted) >= 2
    with open(run / "truth" / "tokens.jsonl") as f:
        lines = [json.loads(x) for x in f]
    hits = {(r["party"], h["row"], h["canary"]) for r in lines if r["step"] == 0 for h in r["canaries"]}
    assert planted <= hits
    by_id = {c["id"]: c for c in canaries}
    for r in lines:
        for h in r["canaries"]:
            assert r["input_ids"][h["row"]][h["start"]:h["end"]] == by_id[h["canary"]]["token_ids"]
    scores = dager["scores"]
    assert scores["canaries_present"] == len(scores["canary_rows"]) >= len(planted)
    assert scores["canary_recovery"] == 1.0
    assert planted <= {(c["party"], c["row"], c["canary"]) for c in scores["canary_rows"] if c["step"] == 0}


def test_dager_needs_weights_it_can_rebuild(run):
    """A party sees no other party's gradient; as wire, step 1 is rebuilt from the updates."""
    attack = get_attack("dager")
    view = AdversaryView(run, "wire", knowledge=attack.threat_model.knowledge)
    recs = attack.run(view, **attack.resolve_options({"steps": [1]}))
    assert {r.step for r in recs} == {1} and all(len(r.token_ids) == 16 for r in recs)


def test_tag_is_well_above_chance(run):
    """TAG (defaults) against a guess of each position uniformly from the bag of tokens,
    whose expected token accuracy is 1 / bag size."""
    attack = get_attack("tag")
    view = AdversaryView(run, "coordinator")
    recs = attack.run(view, **attack.resolve_options({}))
    assert {r.step for r in recs} == {0} and len(recs) == 4
    tag, _ = Scorer(run).score(recs)
    chance = sum(1 / r.meta["bag"] for r in recs) / len(recs)
    print(f"tag: token accuracy {tag['token_accuracy']:.3f} (chance {chance:.3f}), "
          f"rouge1 {tag['rouge1']:.3f}, rouge2 {tag['rouge2']:.3f}")
    assert tag["token_accuracy"] >= 3 * chance
    assert tag["rouge1"] >= 0.3


# ---- DAGER on gradients computed here, per architecture ----------------------------------------

class Grads:
    """A captured gradient's interface (names, tensor) over a plain dict."""

    def __init__(self, tensors):
        self._t = tensors
        self.names = self.received_names = list(tensors)

    def tensor(self, name):
        return self._t[name]

    received = tensor


def party_gradient(model, ids):
    """What a fedsgd party sends: the named gradients of the LM loss on its batch."""
    model.train()
    model.zero_grad()
    lm_loss(model, ids).backward()
    return GradientBatch("fedsgd", "party-0", 0, Grads({n: p.grad.detach().clone()
                                                       for n, p in model.named_parameters()}))


@pytest.mark.parametrize("family,layers,probe", [("llama", 2, "model.layers.1.self_attn.q_proj"),
                                                 ("llama", 1, "model.layers.0.mlp.gate_proj"),
                                                 ("mixtral", 1, "model.layers.0.self_attn.o_proj")])
def test_dager_per_architecture(family, layers, probe):
    cfg = ModelCfg(family=family, hidden_size=64, num_layers=layers, num_heads=4, num_kv_heads=2,
                   intermediate_size=96, num_experts=4, top_k=2)
    model = build_model(cfg, 300, seed=1)
    ids = torch.randint(3, 300, (3, 10), generator=torch.Generator().manual_seed(2))
    batch = party_gradient(model, ids)
    attacker = attacker_copy(build_model(cfg, 300, seed=1))
    assert sequence_probe(attacker)[0] is attacker.get_submodule(probe)
    seqs, note = Dager.invert(batch, attacker, 0.0, 1e-4, 64, 10, 3)
    assert note is None
    assert sorted(s for s, _ in seqs) == sorted(ids.tolist())


def test_dager_reports_the_rank_limit():
    cfg = ModelCfg(family="llama", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                   intermediate_size=48)
    model = build_model(cfg, 300, seed=1)
    ids = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(2))  # 64 > 32
    seqs, note = Dager.invert(party_gradient(model, ids), attacker_copy(model), 0.0, 1e-4, 64, 16, 4)
    assert seqs == [] and "rank reached the hidden size 32" in note


def test_tag_differentiates_twice_through_a_mixture_of_experts():
    cfg = ModelCfg(family="mixtral", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                   intermediate_size=48, num_experts=4, top_k=2)
    model = build_model(cfg, 300, seed=1)
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(2))
    batch = party_gradient(model, ids)
    attacker = second_order_copy(build_model(cfg, 300, seed=1))
    bag = token_bag(batch, attacker)
    # the router's auxiliary loss reaches the last position too: the bag is complete
    assert set(bag) == set(ids.flatten().tolist())
    dist = GradientDistance(attacker, batch, alpha=0.01)
    assert dist.of_tokens(ids) < 1e-6             # the truth matches its own gradient
    assert dist.of_tokens(ids.flip(1)) > 1e-2
    gen = torch.Generator().manual_seed(0)
    guess = optimise(attacker, dist, bag, (2, 8), "mixture", 3, 0.1, gen)
    assert guess.shape == (2, 8) and set(guess.flatten().tolist()) <= set(bag)
    better, d = lamp_reorder(dist, guess, torch.tensor(bag), 5, gen)
    assert d <= dist.of_tokens(guess)


def test_bag_of_tokens_sees_through_gradient_noise():
    """Gaussian noise (sigma 0.01, the regress gate's defence) on the embedding gradient:
    absent rows share the noise's norm, so the widest gap still separates the bag."""
    cfg = ModelCfg(family="llama", hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                   intermediate_size=96)
    model = build_model(cfg, 300, seed=1)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    batch = party_gradient(model, ids)
    name = "model.embed_tokens.weight"
    exact = set(token_bag(batch, model))
    assert exact == set(ids[:, :-1].flatten().tolist())
    noisy = dict(batch.group._t)
    noise = torch.randn(noisy[name].shape, generator=torch.Generator().manual_seed(3))
    noisy[name] = noisy[name] + 0.01 * noise
    noised = GradientBatch("fedsgd", "party-0", 0, Grads(noisy))
    assert set(token_bag(noised, model)) == exact
    assert len(token_bag(noised, model, rel_tol=1e-9)) == 300   # a fixed cut keeps every noisy row


def test_numerical_rank():
    s = torch.tensor([1.0, 0.3, 2e-4, 3e-8, 1e-8], dtype=torch.float64)
    assert numerical_rank(s) == 3                       # widest gap below 1e-3
    assert numerical_rank(s, rank_tol=1e-3) == 2        # an explicit cut
    assert numerical_rank(torch.tensor([1.0, 0.5, 0.2, 0.1], dtype=torch.float64)) == 4


def test_exposure_of_a_memorised_canary_is_maximal_and_the_global_model_is_rebuilt(run):
    """Secret Sharer exposure: a model fine-tuned on the canary's sentence ranks it first
    among its random candidates (exposure = log2(n + 1)); the FedSGD global model an
    observer holds is the checkpoint with every broadcast update replayed."""
    import math

    from attacks.exposure import candidates_for, exposure, held_models, run_exposure
    view = AdversaryView(run, "coordinator")
    [global_model] = held_models(view).values()
    init = view.init_model()
    assert any(not torch.equal(a, b) for a, b in zip(global_model.parameters(), init.parameters()))
    canary = json.loads((run / "truth" / "canaries.json").read_text())[0]
    tok = view.tokenizer()
    cands = candidates_for(canary, 30)
    assert len(set(cands)) == 30 and canary["value"] not in cands
    ids = torch.tensor([tok.encode(f"{canary['prefix']} {canary['value']}").ids])
    opt = torch.optim.Adam(init.parameters(), lr=1e-2)
    init.train()
    for _ in range(60):
        opt.zero_grad()
        init(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    bits, rank = exposure(init.eval(), tok, canary, cands)
    assert rank == 1 and bits == pytest.approx(math.log2(31))
    out = run_exposure(run, candidates=30)
    assert [m["model"].split(":")[0] for m in out["models"]] == ["reference", "global model after step 1"]
    assert all(0 <= b <= math.log2(31) for m in out["models"] for b in m["exposure"].values())
