"""Shared fixtures: tiny scenarios that run in seconds on a CPU."""
from pathlib import Path

import pytest
import torch

from testbed.scenario import parse_scenario

ROOT = Path(__file__).resolve().parents[1]

# The tests' models are tiny: one thread is as fast, and it keeps parallel jobs from thrashing.
torch.set_num_threads(1)

TINY = {
    "name": "tiny",
    "seed": 3,
    "model": {"family": "mixtral", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
              "num_kv_heads": 1, "intermediate_size": 48, "num_experts": 4, "top_k": 2},
    "data": {"records": 40, "kinds": ["patient_note", "email"], "canaries": {"count": 2},
             "tokenizer": {"vocab_size": 300}, "split": {"method": "iid"}},
    "protocol": {"name": "local"},
    "baselines": ["centralized"],
    "parties": {"count": 2},
    "training": {"steps": 4, "batch_size": 2, "seq_len": 16, "eval_every": 2, "eval_batches": 1},
    "compute": {"mode": "none"},
}


def tiny_scenario(**overrides):
    """The TINY scenario with top-level sections merged from ``overrides``."""
    from testbed.scenario import deep_merge
    return parse_scenario(deep_merge(TINY, overrides), "<tiny>")


@pytest.fixture
def run_tiny(tmp_path):
    """Run a tiny scenario into tmp_path; returns (run path, summary)."""
    from testbed.run.runner import run_scenario

    def _run(sc=None, **overrides):
        sc = sc or tiny_scenario(**overrides)
        return run_scenario(sc, runs_root=tmp_path / "runs", base_dir=ROOT,
                            cache_dir=tmp_path / "cache", progress=False)
    return _run
