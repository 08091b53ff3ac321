"""SanText text privatization (parties/defences/santext.py): the metric-DP bound of the
mechanism's table, its sampling, and its place in a run (training text only, truth kept)."""
import json
import math

import pytest
import torch

from parties.defences.santext import SanText, distances, privacy_loss, probabilities


def table(v=40, d=8, seed=0):
    return torch.randn(v, d, generator=torch.Generator().manual_seed(seed))


def test_probabilities_follow_the_formula():
    emb, eps = table(), 2.0
    dist = distances(emb)
    probs = probabilities(dist, eps)
    x = 5
    z = sum(math.exp(-eps / 2 * float(dist[x, y])) for y in range(len(emb)))
    for y in (0, 5, 17):
        assert float(probs[x, y]) == pytest.approx(math.exp(-eps / 2 * float(dist[x, y])) / z, rel=1e-12)
    assert torch.allclose(probs.sum(dim=1), torch.ones(len(emb), dtype=torch.float64))


@pytest.mark.parametrize("eps", [0.5, 2.0, 8.0])
def test_the_privacy_loss_never_exceeds_epsilon_times_distance(eps):
    emb = table()
    dist = distances(emb)
    loss = privacy_loss(probabilities(dist, eps), dist)
    # Pr[y|x] / Pr[y|x'] <= exp(eps * d(x, x')); the worst pair comes within a factor 2 of it
    assert eps / 2 <= loss <= eps * (1 + 1e-9)


def test_a_wrong_temperature_breaks_the_bound():
    """exp(-eps * d) instead of exp(-eps/2 * d) is only 2*eps-private: the check sees it."""
    emb, eps = table(), 2.0
    dist = distances(emb)
    assert privacy_loss(probabilities(dist, 2 * eps), dist) > eps * (1 + 1e-6)


def test_sampling_matches_the_table_and_keeps_special_tokens():
    emb = table(v=12)
    mech = SanText(emb, epsilon=1.0)
    ids = torch.full((20_000,), 7, dtype=torch.int64)
    ids[:100] = 0                                       # padding/special ids stay
    out = mech(ids, torch.Generator().manual_seed(3))
    assert torch.equal(out[:100], ids[:100])
    freq = torch.bincount(out[100:], minlength=12).double() / (len(ids) - 100)
    assert float((freq - mech.probs[7]).abs().max()) < 0.015


def test_a_run_privatizes_training_text_and_keeps_the_truth(run_tiny):
    path, summary = run_tiny(model={"family": "llama"}, protocol={"name": "fedsgd"}, baselines=[],
                             defences=[{"type": "santext", "epsilon": 0.01}])
    events = [json.loads(s) for s in (path / "metrics.jsonl").read_text().splitlines()]
    info = next(e for e in events if e.get("event") == "defence")
    assert info["type"] == "santext" and info["replaced_fraction"] > 0.9   # eps 0.01: near uniform
    # truth holds the party's own text: every recorded row is a window of its records,
    # made of the tokenizer's encoding of real records (far from uniform noise)
    truth = [json.loads(s) for s in (path / "truth" / "tokens.jsonl").read_text().splitlines()]
    from tests.conftest import tiny_scenario
    from parties.data.dataset import prepare_data
    from testbed.scenario import deep_merge  # noqa: F401
    sc = tiny_scenario(model={"family": "llama"}, protocol={"name": "fedsgd"})
    data = prepare_data(sc, path.parent.parent, None)
    rows = {tuple(r.tolist()) for p in data.parties for r in p.train}
    rows |= {tuple(r.tolist()) for p in data.parties if p.planted is not None for r in p.planted.rows}
    assert truth and all(tuple(row) in rows for t in truth for row in t["input_ids"])
