"""Secure aggregation (parties/defences/secagg.py): masked updates individually look like
noise, their sum is the weighted sum, and FedSGD trains the same with it as without."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parties.defences import secagg

PARTIES = ["party-0", "party-1", "party-2"]


def maskers(frac_bits):
    ms = {p: secagg.Masker(p, bytes([i + 1]) * 32, frac_bits) for i, p in enumerate(PARTIES)}
    publics = {p: m.public for p, m in ms.items()}
    for m in ms.values():
        m.setup(publics)
    return ms


def updates():
    g = torch.Generator().manual_seed(0)
    return {p: {"w": torch.randn(64, 32, generator=g) * 0.05, "b": torch.randn(32, generator=g) * 0.05}
            for p in PARTIES}


def test_pair_keys_agree_and_differ_between_pairs():
    ms = maskers(16)
    assert ms["party-0"].keys["party-1"] == ms["party-1"].keys["party-0"]
    assert ms["party-0"].keys["party-2"] == ms["party-2"].keys["party-0"]
    assert ms["party-0"].keys["party-1"] != ms["party-0"].keys["party-2"]


@pytest.mark.parametrize("frac_bits", [12, 16, 24])
def test_masked_sum_is_the_weighted_mean_within_the_rounding_bound(frac_bits):
    ms, ups, weights = maskers(frac_bits), updates(), {"party-0": 2, "party-1": 3, "party-2": 5}
    masked = [(ms[p].mask(ups[p], weights[p], 7, PARTIES), weights[p]) for p in PARTIES]
    got = secagg.unmask_mean(masked, frac_bits)
    total = sum(weights.values())
    for name in ("w", "b"):
        want = sum(ups[p][name].double() * weights[p] for p in PARTIES) / total
        # each party's fixed-point rounding is at most half a quantum
        bound = len(PARTIES) * 2.0 ** -(frac_bits + 1) / total + 1e-7
        assert float((got[name].double() - want).abs().max()) <= bound


def test_each_masked_update_is_uniform_noise_alone():
    ms, ups = maskers(24), updates()
    masked = ms["party-1"].mask(ups["party-1"], 1, 0, PARTIES)["w"]
    plain = secagg.to_wire(secagg.encode(ups["party-1"]["w"], 24))
    assert masked.dtype == torch.int32 and masked.shape == (64, 32)
    assert float((masked == plain).float().mean()) < 0.001
    # uniform over the 32-bit range: 16 bins each hold 1/16 +- 0.02 of 2048 values
    bins = torch.bincount((secagg.from_wire(masked).reshape(-1) >> 28), minlength=16).double() / masked.numel()
    assert float((bins - 1 / 16).abs().max()) < 0.02
    # and uncorrelated with the update it hides
    x, y = masked.double().reshape(-1), ups["party-1"]["w"].double().reshape(-1)
    corr = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    assert abs(corr) < 0.1
    # a different round gives different pads
    assert not torch.equal(masked, ms["party-1"].mask(ups["party-1"], 1, 1, PARTIES)["w"])


def test_a_party_missing_from_the_relayed_keys_is_refused():
    m = secagg.Masker("party-0", b"\x01" * 32, 16)
    from testbed.errors import ProtocolError
    with pytest.raises(ProtocolError, match="own key"):
        m.setup({"party-1": b"\x02" * 32})


def _capture(run):
    root = Path(run) / "capture"
    lines = [json.loads(s) for s in (root / "index.jsonl").read_text().splitlines()]
    out = []
    for line in lines:
        if line["protocol"] != "fedsgd":
            continue
        f = load_file(str(root / line["file"])) if line.get("file") else {}
        out.append((line, {n: f[t["key"]] for n, t in (line.get("tensors") or {}).items()}))
    return out


def test_fedsgd_with_secagg_the_coordinator_sees_masks_and_sums_them(run_tiny):
    common = dict(model={"family": "llama"}, protocol={"name": "fedsgd"},
                  parties={"count": 3}, baselines=[])
    plain_run, plain = run_tiny(**common)
    sec_run, sec = run_tiny(**common, defences=[{"type": "secagg", "frac_bits": 24}])
    cap = _capture(sec_run)
    keys = [line for line, _ in cap if line["kind"] in ("secagg_key", "secagg_keys")]
    assert len(keys) == 3 + 3 and all(line["step"] == -1 for line in keys)
    grads = [(line, t) for line, t in cap if line["kind"] == "grad"]
    assert grads and all(line["meta"]["secagg"] == {"frac_bits": 24} for line, _ in grads)
    assert all(t.dtype == torch.int32 for _, ts in grads for t in ts.values())
    update0 = next(t for line, t in cap if line["kind"] == "update" and line["step"] == 0)
    round0 = [(t, line["meta"]["n_samples"]) for line, t in grads if line["step"] == 0]
    assert len(round0) == 3
    summed = secagg.unmask_mean(round0, 24)
    assert all(torch.equal(summed[n], update0[n]) for n in update0)   # the broadcast is that sum
    plain_update0 = next(t for line, t in _capture(plain_run) if line["kind"] == "update" and line["step"] == 0)
    for n, t in plain_update0.items():
        assert float((update0[n] - t).abs().max()) <= 3 * 2.0 ** -25 / 6 + 1e-7
    a, b = plain["protocols"]["fedsgd"]["mean_eval_loss"], sec["protocols"]["fedsgd"]["mean_eval_loss"]
    assert a == pytest.approx(b, abs=1e-3)
    # what the coordinator received individually is not the plain gradient
    plain_grad0 = next(t for line, t in _capture(plain_run) if line["kind"] == "grad" and line["step"] == 0)
    name = next(iter(plain_grad0))
    masked0 = next(t for line, t in grads if line["step"] == 0)[name]
    assert float((secagg.decode(secagg.from_wire(masked0), 24) - plain_grad0[name].double()).abs().mean()) > 1.0


def test_dager_inverts_the_securely_aggregated_sum_as_one_larger_batch(tmp_path):
    """2 parties x 2 rows x 16 tokens = 64 positions, no more distinct inputs than the hidden
    size 64: the coordinator's legitimate output -- the mean gradient -- still gives the rows."""
    from attacks.runner import run_attacks
    from testbed.run.runner import run_scenario
    from testbed.scenario import load_scenario
    root = Path(__file__).resolve().parents[1]
    sc = load_scenario(root / "scenarios" / "fedsgd-tiny.yaml",
                       {"baselines": [], "training": {"steps": 1},
                        "defences": [{"type": "secagg"}]})
    path, _ = run_scenario(sc, runs_root=tmp_path, base_dir=root, cache_dir=tmp_path / "c", progress=False)
    [agg] = run_attacks(path, [{"name": "dager", "observer": "coordinator",
                                "options": {"aggregate": True, "steps": [0]}}], write=False)
    assert agg["scores"]["rows"] == 4 and agg["scores"]["token_accuracy"] >= 0.9
    [per_party] = run_attacks(path, [{"name": "dager", "observer": "coordinator"}], write=False)
    assert "rows" not in per_party["scores"]          # masked updates: no party's gradient to invert


def test_defences_run_the_same_in_real_processes_over_tcp(tmp_path):
    """FedSGD with secure aggregation, top-k and SanText, run as a coordinator and party
    processes on loopback (the container engine, real TCP): the same losses, step for step,
    and the same captured bytes as the embedded engine."""
    import yaml
    from testbed.container.loopback import Loopback
    from testbed.container.prepare import prepare
    from testbed.run.runner import run_scenario
    from tests.conftest import tiny_scenario
    sc = tiny_scenario(model={"family": "llama"}, protocol={"name": "fedsgd"}, baselines=[],
                       defences=[{"type": "santext", "epsilon": 50.0}, {"type": "secagg"},
                                 {"type": "topk", "fraction": 0.5, "kinds": ["update"]}])
    emb, _ = run_scenario(sc, runs_root=tmp_path / "emb", base_dir=tmp_path, cache_dir=None, progress=False)
    scenario_file = tmp_path / "scenario.yaml"
    scenario_file.write_text(yaml.safe_dump(sc.resolved()))
    prepare(sc, tmp_path / "data")
    lb = Loopback(sc, scenario_file, tmp_path / "data", tmp_path / "runs", "lb")
    try:
        lb.start_coordinator()
        lb.start_parties()
        codes = lb.wait()
    finally:
        lb.kill()
    assert set(codes.values()) == {0}, lb.text("coordinator")

    def losses(run):
        return sorted((r["party"], r["step"], r["loss"]) for r in
                      (json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines())
                      if r.get("event") == "train" and r.get("protocol") == "fedsgd")

    def wire(run):
        return sorted((r["kind"], r["src"], r["dst"], r["step"], r["bytes"]) for r in
                      (json.loads(s) for s in (run / "capture" / "index.jsonl").read_text().splitlines()))
    assert losses(lb.run_dir) == losses(emb) and len(losses(emb)) == 2 * 4
    assert wire(lb.run_dir) == wire(emb)
