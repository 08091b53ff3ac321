"""The ``init: {pretrain: ...}`` section: a shared starting checkpoint pre-trained on public
text, cached by its config hash and reused by every protocol and every seed of a run."""
import json

import pytest
import torch
from safetensors.torch import load_file

from parties.data.tokenizer import load_tokenizer
from parties.models import build_model
from testbed.errors import ConfigError
from testbed.run.seeds import run_seeds

from conftest import ROOT, tiny_scenario


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_pretrained_init_is_shared_cached_and_reused(tmp_path):
    cache = tmp_path / "init-cache"
    sc = tiny_scenario(protocol={"name": "pcmoe"}, baselines=["centralized"],
                       init={"pretrain": {"steps": 3, "records": 40, "cache_dir": str(cache)}})
    parent, _ = run_seeds(sc, [0, 1], runs_root=tmp_path / "runs", base_dir=ROOT,
                          cache_dir=tmp_path / "tok", progress=False)
    ckpts = list(cache.iterdir())
    assert len(ckpts) == 1                              # one pre-training for both seeds
    base = json.loads((ckpts[0] / "base.json").read_text())
    assert base["steps"] == 3 and base["kinds"] == ["support_ticket", "bank_statement", "hr_review"]
    assert set(base["kinds"]).isdisjoint(sc.data.kinds)  # public text: kinds no party holds
    cached = _weights(ckpts[0])
    for seed in (0, 1):
        run = parent / f"seed-{seed}"
        assert json.loads((run / "public" / "pretrain.json").read_text())["key"] == base["key"] == ckpts[0].name
        got = _weights(run / "public" / "init-model")
        assert got.keys() == cached.keys() and all(torch.equal(got[k], cached[k]) for k in got)
        assert (run / "public" / "tokenizer.json").read_text() == (ckpts[0] / "tokenizer.json").read_text()
    # it was trained: not the random init of the same shapes
    vocab = load_tokenizer(ckpts[0] / "tokenizer.json").get_vocab_size()
    fresh = build_model(sc.model, vocab, base["seed"]).state_dict()
    assert any(not torch.equal(fresh[k], cached[k]) for k in cached if k in fresh)
    mtime = (ckpts[0] / "base.json").stat().st_mtime_ns
    # a changed pre-training setting is another checkpoint; the same settings are reused
    run_seeds(sc, [2], runs_root=tmp_path / "runs", base_dir=ROOT, cache_dir=tmp_path / "tok", progress=False)
    assert (ckpts[0] / "base.json").stat().st_mtime_ns == mtime and len(list(cache.iterdir())) == 1


def test_init_section_errors():
    with pytest.raises(ConfigError, match="init.pretrain builds the checkpoint and its tokenizer; remove model.path"):
        tiny_scenario(model={"path": "x"}, init={"pretrain": {"steps": 2}})
    with pytest.raises(ConfigError, match=r"init.pretrain.steps: must be > 0"):
        tiny_scenario(init={"pretrain": {"steps": 0}})
    from parties.pretrain import init_settings
    with pytest.raises(ConfigError, match="init.pretrain.kinds.*unknown kind"):
        init_settings(tiny_scenario(init={"pretrain": {"kinds": ["novels"]}}))
