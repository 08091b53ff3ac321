"""End-to-end runs of the embedded engine on tiny scenarios: run directory, determinism,
memory budgets, crash safety."""
import json

import pytest
import yaml
from safetensors.torch import load_file

from testbed.errors import BudgetExceeded
from testbed.rundir import read_metrics

from conftest import tiny_scenario


def _losses(path, protocol):
    return [(r["party"], r["step"], r["loss"]) for r in read_metrics(path)
            if r["event"] == "train" and r["protocol"] == protocol]


def test_run_directory_contract(run_tiny):
    path, summary = run_tiny()
    for rel in ("scenario.yaml", "manifest.json", "metrics.jsonl", "capture/index.jsonl",
                "truth/tokens.jsonl", "truth/canaries.json", "truth/records.jsonl",
                "public/tokenizer.json", "public/init-model/config.json", "summary.json"):
        assert (path / rel).exists(), rel
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["seed"] == 3 and manifest["end"]
    resolved = yaml.safe_load((path / "scenario.yaml").read_text())
    assert resolved["training"]["lr"] == 0.003  # defaults filled in
    metrics = read_metrics(path)
    assert len(_losses(path, "local")) == 2 * 4 and len(_losses(path, "centralized")) == 4
    evals = [r for r in metrics if r["event"] == "eval"]
    assert {(r["protocol"], r["party"]) for r in evals} == {
        ("local", "party-0"), ("local", "party-1"), ("centralized", "party-0"), ("centralized", "party-1")}
    mem = [r for r in metrics if r["event"] == "memory"]
    assert {r["party"] for r in mem} == {"party-0", "party-1", "site"}
    from transformers import AutoModelForCausalLM
    n_tensors = len(list(AutoModelForCausalLM.from_pretrained(path / "public/init-model").parameters()))
    for r in mem:
        assert r["peak"] == r["params"] + r["grads"] + r["optimizer"] + r["activations"]
        # AdamW in fp32: exp_avg + exp_avg_sq per parameter, plus a 4-byte step per tensor
        assert r["grads"] == r["params"] and r["optimizer"] == 2 * r["params"] + 4 * n_tensors
        assert r["activations"] > 0
    truth = [json.loads(l) for l in (path / "truth/tokens.jsonl").read_text().splitlines()]
    assert len(truth) == 8 and all(len(t["input_ids"]) == 2 for t in truth)
    assert set(summary["protocols"]) == {"local", "centralized"}


def test_params_bytes_match_the_model(run_tiny):
    import torch
    from transformers import AutoModelForCausalLM
    path, summary = run_tiny()
    model = AutoModelForCausalLM.from_pretrained(path / "public/init-model")
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    assert summary["protocols"]["local"]["memory"]["party-0"]["params"] == n
    assert model.dtype == torch.float32


def test_same_seed_same_losses(run_tiny):
    a, _ = run_tiny()
    b, _ = run_tiny()
    for proto in ("local", "centralized"):
        assert _losses(a, proto) == _losses(b, proto)
    c, _ = run_tiny(seed=4)
    assert _losses(a, "local") != _losses(c, "local")


def test_budget_exceeded_names_party_budget_and_peak(run_tiny, tmp_path):
    with pytest.raises(BudgetExceeded) as exc:
        run_tiny(parties={"count": 2, "memory_budget": "100KiB"})
    msg = str(exc.value)
    assert msg.startswith("party-0: peak accelerator memory") and "budget 100.00 KiB" in msg
    run = exc.value.run_dir
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "BudgetExceeded" in manifest["error"]
    assert (run / "scenario.yaml").exists()


def test_budget_warn_mode_finishes(run_tiny, caplog):
    path, summary = run_tiny(parties={"count": 2, "memory_budget": "100KiB", "on_exceed": "warn"})
    assert json.loads((path / "manifest.json").read_text())["status"] == "ok"
    assert any("exceeds budget" in r.message for r in caplog.records)


def test_crash_leaves_readable_run_directory(run_tiny, monkeypatch):
    import parties.base as base
    real = base.lm_loss
    calls = {"n": 0}

    def flaky(model, ids):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("simulated crash")
        return real(model, ids)

    monkeypatch.setattr(base, "lm_loss", flaky)
    with pytest.raises(RuntimeError, match="simulated crash") as exc:
        run_tiny()
    run = exc.value.run_dir
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
    assert len(_losses(run, "local")) == 5  # every finished step is on disk
    assert len((run / "truth/tokens.jsonl").read_text().splitlines()) == 6


def test_from_pretrained_local_path(run_tiny, tmp_path):
    """A model saved by the testbed loads through model.path (from_pretrained)."""
    first, _ = run_tiny()
    path, summary = run_tiny(model={"path": str(first / "public/init-model")})
    a = load_file(str(first / "public/init-model/model.safetensors"))
    b = load_file(str(path / "public/init-model/model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert _losses(first, "local") == _losses(path, "local")


def test_dense_llama_family(run_tiny):
    path, summary = run_tiny(model={"family": "llama"})
    assert summary["protocols"]["centralized"]["mean_eval_loss"] > 0
