"""Tests for the split-learning protocol (parties/split.py) on scenarios/split-tiny.yaml."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from parties import layers as L
from testbed.engine import codec
from testbed.engine.codec import Message
from testbed.errors import ConfigError
from testbed.run.runner import run_scenario
from testbed.scenario import load_scenario

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "scenarios" / "split-tiny.yaml"


def run(tmp_path, **over):
    over.setdefault("baselines", [])
    sc = load_scenario(TINY, over)
    path, summary = run_scenario(sc, runs_root=tmp_path, base_dir=REPO, cache_dir=REPO / ".cache/tokenizers",
                                 progress=False)
    return sc, path, summary


def index(path):
    return [json.loads(line) for line in open(path / "capture" / "index.jsonl")]


def tensor(path, rec, name):
    return load_file(str(path / "capture" / rec["file"]))[rec["tensors"][name]["key"]]


def truth(path, party, step):
    for line in open(path / "truth" / "tokens.jsonl"):
        r = json.loads(line)
        if r["party"] == party and r["step"] == step:
            return torch.tensor(r["input_ids"])
    raise KeyError((party, step))


@pytest.fixture(scope="module")
def vanilla(tmp_path_factory):
    return run(tmp_path_factory.mktemp("split"), training={"steps": 2, "eval_every": 2})


def test_party_plus_server_logits_equal_full_model_through_the_wire():
    """Party bottom -> codec -> server top gives the full model's logits exactly (both shapes)."""
    from parties.models import build_model
    sc = load_scenario(TINY)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    full = build_model(sc.model, 512, 0)
    with torch.no_grad():
        ref = full(input_ids=ids).logits
        for k in range(3):
            party = L.keep_only(build_model(sc.model, 512, 0), embed=True, blocks=range(k), head=True)
            server = L.keep_only(build_model(sc.model, 512, 0), blocks=range(k, 2), head=True)
            act = L.run_blocks(party, L.run_embed(party, ids), 0, k)
            act = codec.decode(codec.encode(Message("act", tensors={"act": act}))).tensors["act"]
            logits = L.run_head(server, L.run_blocks(server, act, k, 2))
            assert torch.equal(logits, ref)
            if k < 2:   # U-shape: the server returns the last hidden state, the party applies the head
                server_u = L.keep_only(build_model(sc.model, 512, 0), blocks=range(k, 2))
                hidden = L.run_blocks(server_u, act, k, 2)
                assert torch.equal(L.run_head(party, hidden), ref)
                assert not any(n.startswith("lm_head") for n, _ in server_u.named_parameters())


def test_bytes_per_message_follow_the_formula(vanilla):
    sc, path, summary = vanilla
    B, T, H = sc.training.batch_size, sc.training.seq_len, sc.model.hidden_size
    recs = [r for r in index(path) if r["kind"] in ("act", "grad")]
    assert len(recs) == 2 * 2 * 2   # steps x parties x (act, grad)
    for r in recs:
        body = B * T * H * 4 + (B * T * 8 if r["kind"] == "act" else 0)   # float32 act + int64 labels
        assert r["bytes"] == r["header_bytes"] + body
        zeros = {n: torch.zeros(t["shape"], dtype=getattr(torch, t["dtype"])) for n, t in r["tensors"].items()}
        again = codec.encode(Message(r["kind"], src=r["src"], dst=r["dst"], step=r["step"], meta=r["meta"],
                                     tensors=zeros))
        assert codec.header_size(again) == r["header_bytes"] and len(again) == r["bytes"]
        party = r["src"] if r["kind"] == "act" else r["dst"]
        assert r["meta"]["party"] == party and r["meta"]["layer"] == 1
        assert r["meta"]["direction"] == ("fwd" if r["kind"] == "act" else "bwd")
    assert summary["protocols"]["split"]["bytes"] == sum(r["bytes"] for r in index(path))


def test_captured_activations_are_the_party_bottom_on_the_true_batch(vanilla):
    sc, path, _ = vanilla
    init = AutoModelForCausalLM.from_pretrained(path / "public" / "init-model")
    first = next(r for r in index(path) if r["kind"] == "act" and r["src"] == "party-1")
    ids = truth(path, "party-1", 0)
    assert torch.equal(tensor(path, first, "labels"), ids)
    with torch.no_grad():
        act = L.run_blocks(init, L.run_embed(init, ids), 0, 1)
    assert torch.allclose(tensor(path, first, "act"), act, atol=1e-6, rtol=0)


def test_round_robin_order_and_logs(vanilla):
    sc, path, _ = vanilla
    # parties compute concurrently, but the server serves them in turn: its replies are ordered
    grads = [(r["step"], r["dst"]) for r in index(path) if r["kind"] == "grad"]
    assert grads == [(0, "party-0"), (0, "party-1"), (1, "party-0"), (1, "party-1")]
    metrics = [json.loads(line) for line in open(path / "metrics.jsonl")]
    train = [(m["step"], m["party"]) for m in metrics if m.get("event") == "train"]
    assert sorted(train) == [(0, "party-0"), (0, "party-1"), (1, "party-0"), (1, "party-1")]
    evals = {m["party"]: m["eval_loss"] for m in metrics if m.get("event") == "eval"}
    assert set(evals) == {"party-0", "party-1"} and all(4 < v < 8 for v in evals.values())


def test_u_shape_keeps_labels_and_head_on_the_party(tmp_path):
    sc, path, _ = run(tmp_path, training={"steps": 1, "eval_every": 5},
                      protocol={"name": "split", "options": {"u_shape": True, "cut_layer": 1}})
    train = [r for r in index(path) if not r["meta"].get("eval")]
    for p in ("party-0", "party-1"):
        kinds = [(r["kind"], r["src"], r["dst"]) for r in train if p in (r["src"], r["dst"])]
        assert kinds == [("act", p, "server"), ("hidden", "server", p), ("hidden_grad", p, "server"),
                         ("grad", "server", p)]
    assert [r["dst"] for r in train if r["kind"] == "hidden"] == ["party-0", "party-1"]
    assert all("labels" not in r["tensors"] for r in index(path))
    hidden = next(r for r in train if r["kind"] == "hidden")
    assert hidden["meta"]["layer"] == 2 and hidden["tensors"]["hidden"]["shape"] == [2, 16, 64]


def test_splitfed_average_is_the_row_weighted_mean(tmp_path):
    sc, path, _ = run(tmp_path, training={"steps": 1, "eval_every": 5},
                      protocol={"name": "split", "options": {"cut_layer": 0, "sync": "splitfed"}})
    recs = index(path)
    sent = [r for r in recs if r["kind"] == "weights"]
    back = [r for r in recs if r["kind"] == "avg_weights"]
    assert [r["dst"] for r in sent] == ["fedserver"] * 2 and sorted(r["dst"] for r in back) == ["party-0", "party-1"]
    assert list(sent[0]["tensors"]) == ["model.embed_tokens.weight"]   # cut 0: embeddings only
    w = [r["meta"]["n_samples"] for r in sent]
    name = "model.embed_tokens.weight"
    mean = sum(tensor(path, r, name) * (n / sum(w)) for r, n in zip(sent, w))
    assert torch.allclose(tensor(path, back[0], name), mean, atol=1e-7, rtol=0)


@pytest.mark.parametrize("options,match", [
    ({"cut_layer": 3}, "cut_layer: must be <= 2"),
    ({"cut_layer": 2, "u_shape": True}, "cut_layer: must be <= 1"),
    ({"sync": "always"}, "sync: must be 'none' or 'splitfed'"),
    ({"u_shape": "yes"}, "u_shape: must be true or false"),
    ({"cutlayer": 1}, "cutlayer: unknown option; valid: cut_layer, u_shape, sync"),
])
def test_bad_options_are_config_errors(options, match):
    from parties.base import RoleContext
    from parties.split import Split
    sc = load_scenario(TINY, {"protocol": {"name": "split", "options": options}})
    ctx = RoleContext(scenario=sc, vocab_size=512, parties=[None, None], device=torch.device("cpu"),
                      build_model=None, protocol_name="split")
    with pytest.raises(ConfigError, match=match) as err:
        Split(ctx)
    assert err.value.path == "protocol.options"
