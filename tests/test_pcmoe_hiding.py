"""PC-MoE's hiding options (parties/pcmoe/layout.py): each keeps the math and shows the host
only what it promises.

For every option a tiny 2-party run gives the same training and held-out losses as the
option off, and its capture shows the promise: shuffled rows whose truth still places
them, one row per (token, host), per-expert counts that are multiples of N (bytes by the
codec's formula), evaluation with the training kinds and meta.  The per-position scorer
stays aligned: embedding-nn's per-position accuracy does not move with the option.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from attacks.inversion_common import attacker_model, moe_inputs
from attacks.runner import run_attacks
from attacks.view import AdversaryView
from parties.pcmoe.host import EVAL_FWD, FWD
from parties.pcmoe.layout import WireLayout
from parties.pcmoe.protocol import validate_options
from testbed.errors import ConfigError
from testbed.run.runner import run_scenario

from conftest import ROOT, tiny_scenario

PAD = 4
CASES = {"shuffle": {"shuffle_rows": True}, "dedup": {"dedup_rows": True}, "pad": {"pad_counts": PAD},
         "disguised": {"eval_traffic": "disguised"},
         "all": {"shuffle_rows": True, "dedup_rows": True, "pad_counts": 3, "eval_traffic": "disguised"}}
EXPERT_KINDS = (FWD, "expert_out", "expert_bwd", "expert_grad_in", EVAL_FWD, "eval_expert_out")


class Run:
    """One tiny PC-MoE run: losses, capture index and truth."""

    def __init__(self, path):
        self.path = Path(path)
        recs = [json.loads(line) for line in open(self.path / "metrics.jsonl")]
        self.train = {(r["party"], r["step"]): r["loss"] for r in recs if r.get("event") == "train"}
        self.eval = {(r["party"], r["step"]): r["eval_loss"] for r in recs if r.get("event") == "eval"}
        self.index = [json.loads(line) for line in open(self.path / "capture" / "index.jsonl")]
        self.routes = [json.loads(line) for line in open(self.path / "truth" / "routes.jsonl")]
        self.tokens = {(r["party"], r["step"]): r["input_ids"]
                       for r in map(json.loads, open(self.path / "truth" / "tokens.jsonl"))}

    def msgs(self, kind, step=None):
        return [m for m in self.index if m["kind"] == kind and (step is None or m["step"] == step)]

    def training_routes(self):
        return {(r["party"], r["step"], r["layer"], r["host"]): r["positions"] for r in self.routes
                if not r.get("eval")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> :class:`Run`, each run once: ``off`` and every entry of CASES."""
    root, done = tmp_path_factory.mktemp("hiding"), {}

    def get(name):
        if name not in done:
            sc = tiny_scenario(protocol={"name": "pcmoe", "options": CASES.get(name, {})}, baselines=[],
                               model={"num_layers": 2}, capture={"tensors": True},
                               training={"steps": 4, "eval_every": 2, "eval_batches": 2})
            path, _ = run_scenario(sc, runs_root=root / "runs", base_dir=ROOT, cache_dir=root / "cache",
                                   progress=False, run_name=name)
            done[name] = Run(path)
        return done[name]
    return get


def framed_bytes(m):
    """The codec's size of a captured message: header plus raw tensor bytes."""
    size = {"float32": 4, "int32": 4}
    return m["header_bytes"] + sum(size[t["dtype"]] * math.prod(t["shape"]) for t in m["tensors"].values())


def test_options_are_validated():
    with pytest.raises(ConfigError) as err:
        validate_options({"shuffle_rows": "yes", "dedup_rows": 1, "pad_counts": -2, "eval_traffic": "local"})
    text = str(err.value)
    assert "shuffle_rows: must be true or false (got 'yes')" in text
    assert "dedup_rows: must be true or false (got 1)" in text
    assert "pad_counts: must be an integer >= 0 (got -2)" in text
    assert "eval_traffic: 'local' is not possible in pcmoe" in text
    for bad, msg in (({"pad_counts": True}, "pad_counts"), ({"eval_traffic": "hidden"}, "'plain' or 'disguised'")):
        with pytest.raises(ConfigError, match=msg):
            validate_options(bad)
    assert validate_options(CASES["all"])["pad_counts"] == 3


@pytest.mark.parametrize("shuffle,dedup,pad", [(s, d, p) for s in (False, True) for d in (False, True)
                                               for p in (0, 3)])
def test_layout_puts_every_pair_back(shuffle, dedup, pad):
    """Rows carry the tokens the layout says; ``take`` finds each plan pair's reply row."""
    blocks = [(1, torch.tensor([4, 0, 7, 2, 5])), (3, torch.tensor([0, 5, 6]))]
    wire = WireLayout(shuffle, dedup, pad, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    lay = wire.lay_out(blocks)
    flat = torch.randn(8, 6)
    hidden = wire.hidden(lay, flat)
    real = lay.row_tokens >= 0
    torch.testing.assert_close(hidden[real], flat[lay.row_tokens[real]])
    assert all(c % pad == 0 for c in lay.counts) if pad else lay.counts == [5, 3]
    pair_rows = lay.row_index if dedup else torch.arange(sum(lay.counts))
    pair_tokens = lay.row_tokens[pair_rows]
    assert pair_tokens[lay.take].tolist() == [4, 0, 7, 2, 5, 0, 5, 6]          # plan order
    assert int((pair_tokens < 0).sum()) == sum(lay.counts) - 8                  # the rest are dummies
    if dedup:
        assert sorted(lay.row_tokens[real].tolist()) == [0, 2, 4, 5, 6, 7]      # one row per token
        for block in torch.split(lay.row_index, lay.counts):
            assert block.tolist() == sorted(block.tolist())


@pytest.mark.parametrize("case", list(CASES))
def test_losses_equal_the_option_off(runs, case):
    off, on = runs("off"), runs(case)
    assert len(off.train) == 4 and len(off.eval) >= 4 and on.train.keys() == off.train.keys()
    assert on.eval.keys() == off.eval.keys()
    for got, want in ((on.train, off.train), (on.eval, off.eval)):
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), (case, k)


def test_shuffled_rows_leave_token_order_and_truth_places_them(runs):
    off, on = runs("off"), runs("shuffle")
    r_off, r_on = off.training_routes(), on.training_routes()
    assert r_off.keys() == r_on.keys()
    rising = {"off": [0, 0], "shuffle": [0, 0]}
    for name, run, routes in (("off", off, r_off), ("shuffle", on, r_on)):
        for m in run.msgs(FWD, step=0):
            pos = routes[(m["meta"]["origin"], 0, m["meta"]["layer"], m["meta"]["host"])]
            for block in _split(pos, m["meta"]["counts"]):
                flat = [b * 100 + p for b, p in block]
                rising[name][0] += sum(a < b for a, b in zip(flat, flat[1:]))
                rising[name][1] += len(flat) - 1
    for key in r_off:   # the same pairs, per expert: only their order changed
        assert sorted(map(tuple, r_off[key])) == sorted(map(tuple, r_on[key]))
    assert r_off != r_on
    off_frac, on_frac = (rising[k][0] / rising[k][1] for k in ("off", "shuffle"))
    assert off_frac > 0.8 and 0.2 < on_frac < 0.8, (off_frac, on_frac)
    _rows_match_truth(on, r_on)


def _split(pos, counts):
    out, at = [], 0
    for c in counts:
        out.append(pos[at:at + c])
        at += c
    return out


def _rows_match_truth(run, routes):
    """At step 0 (init weights) every real row sent equals the attacker's expert input at
    the position truth gives it, in the order sent."""
    wire = AdversaryView(run.path, "wire")
    model = attacker_model(wire)
    msgs = [m for m in wire.messages(kind=FWD) if m.step == 0]
    assert msgs
    for m in msgs:
        pos = torch.tensor(routes[(m.meta["origin"], 0, m.meta["layer"], m.meta["host"])])
        with torch.no_grad():
            x = moe_inputs(model, torch.tensor(run.tokens[(m.meta["origin"], 0)]), m.meta["layer"])
        hidden = m.tensor("hidden")
        real = pos[:, 0] >= 0
        assert len(pos) == len(hidden) and real.any()
        torch.testing.assert_close(hidden[real], x[pos[real, 0], pos[real, 1]], rtol=1e-4, atol=1e-5)


def test_dedup_sends_each_token_once_per_host(runs):
    off, on = runs("off"), runs("dedup")
    hidden = 32
    repeated_off = 0
    for m in off.msgs(FWD):
        pos = off.training_routes()[(m["meta"]["origin"], m["step"], m["meta"]["layer"], m["meta"]["host"])]
        repeated_off += len(pos) - len({tuple(p) for p in pos})
    assert repeated_off > 0                     # without the option some tokens go twice
    routes = on.training_routes()
    pairs = {k: 0 for k in ("off", "dedup")}
    for m in on.msgs(FWD):
        meta, t = m["meta"], m["tensors"]
        pos = routes[(meta["origin"], m["step"], meta["layer"], meta["host"])]
        assert len(pos) == len({tuple(p) for p in pos}) == t["hidden"]["shape"][0]
        assert t["row_index"] == {**t["row_index"], "dtype": "int32", "shape": [sum(meta["counts"])]}
        assert m["bytes"] == framed_bytes(m) == m["header_bytes"] + len(pos) * hidden * 4 + sum(meta["counts"]) * 4
        pairs["dedup"] += sum(meta["counts"])
    pairs["off"] = sum(sum(m["meta"]["counts"]) for m in off.msgs(FWD))
    assert pairs["dedup"] == pairs["off"]       # one output per (token, expert) pair, as before
    for kind in ("expert_out", "expert_bwd", "expert_grad_in"):
        for m in on.msgs(kind):
            assert m["bytes"] == framed_bytes(m)
    assert sum(m["bytes"] for m in on.msgs(FWD)) < sum(m["bytes"] for m in off.msgs(FWD))
    _rows_match_truth(on, routes)


def test_padded_counts_are_multiples_and_bytes_follow(runs):
    off, on = runs("off"), runs("pad")
    hidden, routes = 32, on.training_routes()
    dummies = 0
    for kind in EXPERT_KINDS:
        for m in on.msgs(kind):
            counts = m["meta"]["counts"]
            assert counts and all(c % PAD == 0 and c > 0 for c in counts), (kind, counts)
            (t,) = m["tensors"].values()
            assert t["shape"] == [sum(counts), hidden]
            assert m["bytes"] == framed_bytes(m) == m["header_bytes"] + sum(counts) * hidden * 4
    for m in on.msgs(FWD):
        pos = routes[(m["meta"]["origin"], m["step"], m["meta"]["layer"], m["meta"]["host"])]
        dummies += sum(p == [-1, -1] for p in pos)
    assert dummies > 0
    real = sum(sum(m["meta"]["counts"]) for m in on.msgs(FWD)) - dummies
    assert real == sum(sum(m["meta"]["counts"]) for m in off.msgs(FWD))
    # the owner sends zero gradients for dummy rows
    wire = AdversaryView(on.path, "wire")
    fwd = {(m.meta["origin"], m.step, m.meta["layer"], m.dst): m for m in wire.messages(kind=FWD)}
    for b in wire.messages(kind="expert_bwd"):
        pos = torch.tensor(routes[(b.meta["origin"], b.step, b.meta["layer"], b.dst)])
        g = b.tensor("grad_output")
        assert (g[pos[:, 0] < 0] == 0).all() and g[pos[:, 0] >= 0].abs().sum() > 0
        assert (b.meta["origin"], b.step, b.meta["layer"], b.dst) in fwd
    _rows_match_truth(on, routes)


def test_disguised_evaluation_looks_like_training(runs):
    off, on = runs("off"), runs("disguised")
    assert off.msgs(EVAL_FWD) and not on.msgs(EVAL_FWD) and not on.msgs("eval_expert_out")
    expert = [m for m in on.index if m["kind"] in EXPERT_KINDS]
    assert expert and all("phase" not in m["meta"] for m in expert)
    assert len(on.msgs(FWD)) == len(off.msgs(FWD)) + len(off.msgs(EVAL_FWD))
    # which forwards were evaluation: only truth knows (routes flagged eval, in send order)
    evals = [r for r in on.routes if r.get("eval")]
    assert len(evals) == len(off.msgs(EVAL_FWD)) and len(on.routes) == len(on.msgs(FWD))
    order = {}
    for r, m in zip(on.routes, on.msgs(FWD)):
        assert (r["party"], r["step"], r["layer"], r["host"]) == \
            (m["meta"]["origin"], m["step"], m["meta"]["layer"], m["meta"]["host"])
        order.setdefault(bool(r.get("eval")), []).append(m)
    shape = {k: {tuple(sorted(m["meta"])) for m in ms} | {tuple(sorted(m["tensors"])) for m in ms}
             for k, ms in order.items()}
    assert shape[True] == shape[False]          # same meta keys and tensors
    # a trained party's evaluation at a step holds the same (origin, step, layer, host)
    # as its training message there: the scorer must tell them apart
    train_keys = {(m["meta"]["origin"], m["step"], m["meta"]["layer"], m["meta"]["host"]) for m in order[False]}
    assert any((m["meta"]["origin"], m["step"], m["meta"]["layer"], m["meta"]["host"]) in train_keys
               for m in order[True])


@pytest.mark.parametrize("case", list(CASES))
def test_embedding_nn_scores_per_position_as_with_the_option_off(runs, case):
    """embedding-nn predicts each row alone: its per-position accuracy must not move when
    the option only reorders, merges, pads or disguises rows -- unless truth is misaligned."""
    got = {}
    for name in ("off", case):
        got[name] = {r["observer"]: r["scores"] for r in
                     run_attacks(runs(name).path, [{"name": "embedding-nn"}], write=False)}
    assert got["off"].keys() == got[case].keys() == {"party-0", "party-1"}
    for who, s in got["off"].items():
        o = got[case][who]
        assert s["token_accuracy"] > 0.3 and s["rows"] == o["rows"]
        assert o["token_accuracy"] == pytest.approx(s["token_accuracy"], abs=1e-9), (case, who)
        if case in ("shuffle", "pad", "disguised"):   # dedup counts a token once, not per expert
            assert o["routed_accuracy"] == pytest.approx(s["routed_accuracy"], abs=1e-9), (case, who)


def test_routing_trace_reads_the_row_index(runs):
    """With ``dedup_rows`` routing-trace reads each row's experts from ``row_index``; without,
    from equal rows: the same observation per token, so the same per-position accuracy."""
    acc = {}
    for name in ("off", "dedup"):
        acc[name] = {r["observer"]: r["scores"]["token_accuracy"] for r in
                     run_attacks(runs(name).path, [{"name": "routing-trace", "options": {"aux_records": 40}}],
                                 write=False)}
    assert acc["dedup"] == pytest.approx(acc["off"], abs=1e-9)
