"""Tests for the transmission defences (parties/defences.py): noise and quantization."""
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from parties import layers as L
from parties.base import RoleContext
from parties.defences import restore, wrap_roles
from testbed.engine import codec
from testbed.run.capture import CaptureWriter
from testbed.engine.codec import Message
from testbed.engine.effects import Log, Recv, Send
from testbed.engine.sim import SimEngine
from testbed.run.runner import endpoint_configs, run_scenario
from testbed.scenario import DefenceCfg, load_scenario

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "tokenizers"
N = 40_000


def ctx_for(defences=()):
    sc = load_scenario(REPO / "scenarios" / "fedsgd-tiny.yaml", {"defences": list(defences)})
    return RoleContext(scenario=sc, vocab_size=64, parties=[], device=torch.device("cpu"), build_model=None,
                       protocol_name="fedsgd")


def exchange(defences, tensors, kind="act", tmp_path=None):
    """party-0 sends ``tensors`` to coordinator through the engine (and capture); returns
    (what the coordinator saw, the capture index line, the captured tensors, value sent back)."""
    ctx = ctx_for(defences)
    seen, replies = {}, {}

    def sender():
        yield Send("coordinator", Message(kind, step=0, meta={"layer": 3}, tensors=tensors))
        replies["got"] = yield Recv(src="coordinator", kind="ack")

    def receiver():
        seen["msg"] = yield Recv(src="party-0")
        yield Send("party-0", Message("ack", step=0, tensors={"x": torch.ones(3)}))
        yield Log({"event": "done"})

    cap = CaptureWriter(tmp_path / "capture", "t") if tmp_path else None
    engine = SimEngine("t", endpoint_configs(ctx.scenario, ["party-0", "coordinator"]), random.Random(0),
                       capture=cap, compute_mode="none")
    engine.run(wrap_roles({"party-0": sender(), "coordinator": receiver()}, ctx.scenario.defences, ctx))
    if cap is None:
        return seen["msg"], None, None, replies["got"]
    cap.close()
    line = json.loads(open(tmp_path / "capture" / "index.jsonl").readline())
    f = load_file(str(tmp_path / "capture" / line["file"]))
    return seen["msg"], line, {n: f[t["key"]] for n, t in line["tensors"].items()}, replies["got"]


@pytest.fixture(scope="module")
def clean():
    return torch.randn(N, generator=torch.Generator().manual_seed(0)) * 3


def test_int8_bytes_and_dequantization_bound(clean, tmp_path):
    ids = torch.arange(10)
    msg, line, wire, back = exchange([{"type": "quantize", "bits": "int8"}], {"h": clean, "ids": ids},
                                     tmp_path=tmp_path)
    assert wire["h"].dtype == torch.int8 and wire["h.scale"].shape == () and wire["ids"].dtype == torch.int64
    assert line["bytes"] == line["header_bytes"] + N * 1 + 4 + 10 * 8        # int8 + scale + untouched ids
    fp32 = codec.encode(Message("act", src="party-0", dst="coordinator", step=0, meta={"layer": 3},
                                tensors={"h": clean, "ids": ids}))
    assert len(fp32) - codec.header_size(fp32) == N * 4 + 10 * 8
    assert (line["bytes"] - line["header_bytes"] - 80) / (N * 4) == pytest.approx(0.25, abs=1e-3)
    scale = clean.abs().max() / 127
    assert wire["h.scale"].item() == pytest.approx(scale.item(), rel=1e-7)
    # the receiving role sees float32 again, within half a quantization step, and no extras
    assert set(msg.tensors) == {"h", "ids"} and msg.tensors["h"].dtype == torch.float32
    assert (msg.tensors["h"] - clean).abs().max() <= scale / 2 + 1e-6
    assert torch.equal(msg.tensors["ids"], ids) and "quantized" not in msg.meta
    assert msg.meta["layer"] == 3 and msg.meta["defences"] == [{"type": "quantize", "bits": "int8"}]
    assert torch.equal(back.tensors["x"], torch.ones(3))   # the reply was quantized too, and restored


@pytest.mark.parametrize("bits,dtype,rel", [("bf16", torch.bfloat16, 2 ** -8), ("fp16", torch.float16, 2 ** -11)])
def test_half_precision_casts(clean, tmp_path, bits, dtype, rel):
    msg, line, wire, _ = exchange([{"type": "quantize", "bits": bits}], {"h": clean}, tmp_path=tmp_path)
    assert wire["h"].dtype == dtype and line["bytes"] == line["header_bytes"] + N * 2
    assert msg.tensors["h"].dtype == torch.float32
    assert ((msg.tensors["h"] - clean).abs() <= clean.abs() * rel + 1e-7).all()


def test_noise_has_the_configured_sigma_and_only_hits_listed_kinds(clean):
    sigma = 0.25
    msg, *_ = exchange([{"type": "noise", "sigma": sigma, "kinds": ["act"]}], {"h": clean})
    diff = msg.tensors["h"] - clean
    assert abs(diff.std().item() - sigma) < 0.05 * sigma and abs(diff.mean().item()) < 0.01
    assert msg.meta["defences"] == [{"type": "noise", "sigma": sigma}]
    other, *_ = exchange([{"type": "noise", "sigma": sigma, "kinds": ["act"]}], {"h": clean}, kind="grad")
    assert torch.equal(other.tensors["h"], clean) and "defences" not in other.meta
    again, *_ = exchange([{"type": "noise", "sigma": sigma, "kinds": ["act"]}], {"h": clean})
    assert torch.equal(again.tensors["h"], msg.tensors["h"])   # seeded per role: reproducible


def test_noise_then_int8_keeps_both_in_order(clean):
    msg, *_ = exchange([{"type": "noise", "sigma": 0.1}, {"type": "quantize", "bits": "int8"}], {"h": clean})
    assert [d["type"] for d in msg.meta["defences"]] == ["noise", "quantize"]
    assert 0.08 < (msg.tensors["h"] - clean).std().item() < 0.12


def test_dp_sgd_only_leaves_roles_unwrapped():
    roles = {"a": iter(())}
    assert wrap_roles(roles, [DefenceCfg(type="dp_sgd")], ctx_for()) is roles


def test_restore_leaves_plain_messages_alone():
    m = Message("x", tensors={"a": torch.ones(2)})
    assert restore(m) is m


def test_noise_on_split_activations_end_to_end(tmp_path):
    """The captured cut-layer activations differ from the clean ones by N(0, sigma^2)."""
    sigma = 0.5
    sc = load_scenario(REPO / "scenarios" / "split-tiny.yaml", {
        "baselines": [], "training": {"steps": 1, "eval_every": 5},
        "defences": [{"type": "noise", "sigma": sigma, "kinds": ["act"]},
                     {"type": "quantize", "bits": "fp16", "kinds": ["grad"]}]})
    path, _ = run_scenario(sc, runs_root=tmp_path, base_dir=REPO, cache_dir=CACHE, progress=False)
    index = [json.loads(line) for line in open(path / "capture" / "index.jsonl")]
    rec = next(r for r in index if r["kind"] == "act" and r["src"] == "party-0")
    f = load_file(str(path / "capture" / rec["file"]))
    act = f[rec["tensors"]["act"]["key"]]
    ids = next(torch.tensor(r["input_ids"]) for r in map(json.loads, open(path / "truth" / "tokens.jsonl"))
               if r["party"] == "party-0")
    assert torch.equal(f[rec["tensors"]["labels"]["key"]], ids)   # int tensors are never noised
    init = AutoModelForCausalLM.from_pretrained(path / "public" / "init-model")
    with torch.no_grad():
        clean = L.run_blocks(init, L.run_embed(init, ids), 0, 1)
    assert abs((act - clean).std().item() - sigma) < 0.05 * sigma
    grads = [r for r in index if r["kind"] == "grad"]
    assert grads and all(r["tensors"]["grad"]["dtype"] == "float16" for r in grads)
    B, T, H = 2, 16, 64
    assert all(r["bytes"] == r["header_bytes"] + B * T * H * 2 for r in grads)


def test_topk_sends_values_and_positions_and_restores_the_k_largest(clean, tmp_path):
    fraction = 0.01
    msg, line, wire, _ = exchange([{"type": "topk", "fraction": fraction}], {"h": clean.reshape(200, 200)},
                                  tmp_path=tmp_path)
    k = 400                                                          # ceil(0.01 * 40_000)
    assert wire["h"].shape == (k,) and wire["h.idx"].dtype == torch.int32
    assert line["bytes"] == line["header_bytes"] + k * 4 + k * 4     # float32 values + int32 positions
    dense = msg.tensors["h"]
    assert dense.shape == (200, 200) and int((dense != 0).sum()) == k and "h.idx" not in msg.tensors
    kept = clean.abs().topk(k).indices
    assert torch.equal(dense.reshape(-1)[kept], clean[kept])          # exactly the k largest, exact values
    assert float(dense.reshape(-1).abs().sum()) == pytest.approx(float(clean[kept].abs().sum()), rel=1e-6)
    assert msg.meta["defences"] == [{"type": "topk", "fraction": fraction}] and "sparse" not in msg.meta


def test_topk_then_int8_restores_in_reverse_order(clean, tmp_path):
    msg, line, wire, _ = exchange([{"type": "topk", "fraction": 0.5}, {"type": "quantize", "bits": "int8"}],
                                  {"h": clean}, tmp_path=tmp_path)
    k = N // 2
    assert wire["h"].dtype == torch.int8 and wire["h.idx"].dtype == torch.int32
    assert line["bytes"] == line["header_bytes"] + k * 1 + 4 + k * 4
    kept = clean.abs().topk(k).indices
    scale = clean.abs().max() / 127
    assert (msg.tensors["h"][kept] - clean[kept]).abs().max() <= scale / 2 + 1e-6
    assert int((msg.tensors["h"] != 0).sum()) <= k


def test_clip_noise_clips_rows_and_scales_noise_to_the_bound(tmp_path):
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(4000, 64, generator=gen) * torch.linspace(0.1, 10, 4000).unsqueeze(1)
    clip = 2.0
    msg, _, wire, _ = exchange([{"type": "clip_noise", "sigma": 0.0, "clip": clip}], {"h": rows},
                               tmp_path=tmp_path)
    norms = rows.norm(dim=1)
    got = msg.tensors["h"]
    assert float(got.norm(dim=1).max()) <= clip * (1 + 1e-6)
    small = norms <= clip
    assert torch.equal(got[small], rows[small])                      # rows within the bound untouched
    assert torch.allclose(got[~small], rows[~small] * (clip / norms[~small]).unsqueeze(1), rtol=1e-6)
    sigma = 0.5
    msg, _, _, _ = exchange([{"type": "clip_noise", "sigma": sigma, "clip": clip}], {"h": rows})
    noise = (msg.tensors["h"] - got).norm(dim=1)                     # ~ sigma * clip per row
    assert float(noise.mean()) == pytest.approx(sigma * clip, rel=0.03)
    msg, _, _, _ = exchange([{"type": "clip_noise", "sigma": sigma, "clip": 0.0}], {"h": rows})
    rel = (msg.tensors["h"] - rows).norm(dim=1) / norms              # clip 0: relative to each row
    assert float(rel.mean()) == pytest.approx(sigma, rel=0.03)
    assert float(rel[:400].mean()) == pytest.approx(float(rel[-400:].mean()), rel=0.1)


def test_secagg_on_a_protocol_without_it_is_a_config_error(run_tiny):
    from testbed.errors import ConfigError
    with pytest.raises(ConfigError, match="'secagg' is not supported by protocol 'local'"):
        run_tiny(defences=[{"type": "secagg"}])


def test_attacks_see_what_the_receiver_saw_under_topk(tmp_path):
    """top-k with fraction 1 sends every entry as values + positions: DAGER, reading the
    capture through the adversary view, must invert the densified gradient exactly."""
    from attacks.runner import run_attacks
    sc = load_scenario(REPO / "scenarios" / "fedsgd-tiny.yaml",
                       {"baselines": [], "training": {"steps": 1},
                        "defences": [{"type": "topk", "fraction": 1.0, "kinds": ["grad"]}]})
    path, _ = run_scenario(sc, runs_root=tmp_path, base_dir=REPO, cache_dir=tmp_path / "c", progress=False)
    lines = [json.loads(s) for s in (path / "capture" / "index.jsonl").read_text().splitlines()]
    line = next(x for x in lines if x["kind"] == "grad")
    assert any(n.endswith(".idx") for n in line["tensors"])
    [res] = run_attacks(path, [{"name": "dager", "observer": "coordinator", "options": {"steps": [0]}}],
                        write=False)
    assert res["scores"]["exact_match"] == 1.0
