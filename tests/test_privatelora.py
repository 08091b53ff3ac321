"""Tests for PrivateLoRA (parties/privatelora/protocol.py) and its baselines, run in the embedded engine.

Golden numbers: bytes per token per layer = (r_c2d + r_d2c) x 3 x dtype bytes (+ exact
codec framing); the protocol's losses, eval and greedy generation match a monolithic
reference (one autograd graph, A·M·B on q/k/v); the capture suffices to solve for M.
"""
import copy
import random

import pytest
import torch

from parties.base import RoleContext, eval_loss
from parties.data.dataset import PartyData
from parties.privatelora.lowrank import PROJECTIONS, frozen_factors, projection_dims
from parties.models import build_model
from parties.privatelora.protocol import causal_ce
from parties.registry import get_protocol
from testbed.run.capture import CaptureWriter
from testbed.engine.sim import SimEngine
from testbed.errors import ConfigError
from testbed.engine.memory import MemoryTracker
from testbed.run.runner import endpoint_configs
from testbed.scenario import load_scenario, parse_scenario
from testbed.costs.throughput import frame_bytes

VOCAB, D, L, R1, R2 = 64, 32, 2, 4, 6


def scenario(**over):
    """A tiny PrivateLoRA scenario as a dict; ``over`` replaces top-level sections."""
    sc = {
        "name": "plora-test", "seed": 3,
        "model": {"family": "llama", "hidden_size": D, "num_layers": L, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64, "max_position": 64},
        "protocol": {"name": "privatelora", "options": {"r_c2d": R1, "r_d2c": R2, "generate_tokens": 3,
                                                         "prompt_len": 5}},
        "parties": {"count": 1, "device": "phone", "link": "5g"},
        "coordinator": {"device": "a100", "link": "datacenter"},
        "training": {"steps": 3, "batch_size": 2, "seq_len": 16, "lr": 0.05, "eval_every": 3,
                     "eval_batches": 1},
        "compute": {"mode": "none"},
    }
    sc.update(over)
    return sc


def synthetic_parties(n=1, seed=0, seq=16):
    g = torch.Generator().manual_seed(seed)
    return [PartyData(f"party-{i}", train=torch.randint(3, VOCAB, (12, seq), generator=g),
                      eval=torch.randint(3, VOCAB, (4, seq), generator=g)) for i in range(n)]


def run_engine(sc_dict, name=None, tmp_path=None, parties=None):
    """Run one protocol of ``sc_dict`` in the SimEngine; -> (logs, stats, capture index, ctx, init)."""
    sc = parse_scenario(sc_dict)
    name = name or sc.protocol.name
    parties = parties or synthetic_parties(sc.parties.count, seq=sc.training.seq_len)
    init = build_model(sc.model, VOCAB, sc.seed)
    truth = []
    ctx = RoleContext(scenario=sc, vocab_size=VOCAB, parties=parties, device=torch.device("cpu"),
                      build_model=lambda: copy.deepcopy(init), protocol_name=name,
                      record_truth=lambda party, step, ids: truth.append((party, step, ids.clone())))
    proto = get_protocol(name)(ctx)
    ctx.trackers = {r: MemoryTracker(r) for r in proto.role_names()}
    capture = CaptureWriter(tmp_path / name, name) if tmp_path is not None else None
    logs = []
    engine = SimEngine(name, endpoint_configs(sc, proto.role_names()), random.Random(sc.seed),
                       on_log=logs.append, capture=capture, compute_mode=sc.compute.mode)
    stats = engine.run(proto.roles())
    index = []
    if capture is not None:
        capture.close()
        import json
        index = [json.loads(x) for x in (tmp_path / name / "index.jsonl").read_text().splitlines()]
    stats["memory"] = {r: t.summary() for r, t in ctx.trackers.items()}
    return {"logs": logs, "stats": stats, "index": index, "ctx": ctx, "init": init, "truth": truth,
            "capture": tmp_path / name if tmp_path is not None else None}


def reference(ctx, init, steps):
    """Monolithic PrivateLoRA: one model, ((x A) M) B added to q/k/v by forward hooks.

    Returns (train losses, M after each step)."""
    tr, o = ctx.training, ctx.scenario.protocol.options
    model = copy.deepcopy(init).requires_grad_(False)
    factors = frozen_factors(model.config, o["r_c2d"], o["r_d2c"],
                             ctx.generator("adapters", "privatelora"), torch.float32)
    ms = [{p: torch.zeros(o["r_c2d"], o["r_d2c"], requires_grad=True) for p in PROJECTIONS} for _ in range(L)]
    for i, layer in enumerate(model.model.layers):
        for p in PROJECTIONS:
            a, b = factors[i][p]
            getattr(layer.self_attn, f"{p}_proj").register_forward_hook(
                lambda mod, inp, out, a=a, b=b, m=ms[i][p]: out + ((inp[0] @ a) @ m) @ b)
    opt = torch.optim.AdamW([m for layer in ms for m in layer.values()], lr=tr.lr, weight_decay=tr.weight_decay)
    gen, losses, history = ctx.generator("party-0"), [], []
    for _ in range(steps):
        ids = ctx.parties[0].sample(tr.batch_size, gen)
        loss = causal_ce(model(input_ids=ids).logits, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        history.append([{p: m.detach().clone() for p, m in layer.items()} for layer in ms])
    return model, factors, losses, history


@pytest.fixture(scope="module")
def plora(tmp_path_factory):
    return run_engine(scenario(), tmp_path=tmp_path_factory.mktemp("plora"))


@pytest.fixture(scope="module")
def ref(plora):
    return reference(plora["ctx"], plora["init"], plora["ctx"].training.steps)


def _payload(rec):
    return rec["bytes"] - rec["header_bytes"]


def test_bytes_per_token_per_layer_equal_the_formula(plora):
    bt = 2 * 16   # batch x tokens of a training pass
    train = [r for r in plora["index"] if r["meta"].get("mode") == "train"]
    for r in train:
        if r["kind"] in ("act_down", "act_up", "grad_down", "grad_up"):
            rank = R1 if r["kind"] in ("act_down", "grad_up") else R2
            assert r["meta"]["rank"] == rank and r["meta"]["projections"] == ["q", "k", "v"]
            assert _payload(r) == bt * 3 * rank * 4
        # the codec's framing, recomputed from the header fields alone
        spec = {"kind": r["kind"], "src": r["src"], "dst": r["dst"], "step": r["step"], "meta": r["meta"],
                "tensors": {n: (t["dtype"], t["shape"]) for n, t in r["tensors"].items()}}
        assert frame_bytes(spec) == r["bytes"]
    per_layer = {}
    for r in train:
        if r["kind"] in ("act_down", "act_up") and r["step"] == 0:
            per_layer[r["meta"]["layer"]] = per_layer.get(r["meta"]["layer"], 0) + _payload(r)
    assert per_layer == {0: (R1 + R2) * 3 * 4 * bt, 1: (R1 + R2) * 3 * 4 * bt}
    # one training step: embeddings, L forward round trips, hidden, its gradient, L grad_down,
    # L-1 grad_up (layer 0's input gradient would only reach the frozen embeddings)
    step0 = [r for r in train if r["step"] == 0]
    assert [r["kind"] for r in step0] == (["embed"] + ["act_down", "act_up"] * L + ["hidden", "grad_hidden"]
                                          + ["grad_down", "grad_up"] * (L - 1) + ["grad_down"])
    expect = bt * 4 * (3 * D + L * 3 * (R1 + R2) + L * 3 * R2 + (L - 1) * 3 * R1)
    assert sum(_payload(r) for r in step0) == expect


def test_matches_monolithic_reference(plora, ref):
    _, _, losses, history = ref
    train = [r["loss"] for r in plora["logs"] if r.get("event") == "train"]
    assert train == pytest.approx(losses, rel=1e-5, abs=1e-6)
    assert all(m.abs().sum() > 0 for layer in history[0] for m in layer.values())   # M did move
    base = next(r for r in plora["logs"] if r.get("event") == "eval" and r["step"] == -1)
    ctx = plora["ctx"]
    batches = ctx.parties[0].eval_batches(ctx.training.batch_size, ctx.training.eval_batches)
    assert base["eval_loss"] == pytest.approx(eval_loss(plora["init"], batches), rel=1e-6)


def test_generation_uses_the_kv_cache_and_matches_greedy_decoding(plora, ref):
    model, factors, _, history = ref
    final = history[-1]
    merged = copy.deepcopy(plora["init"])
    with torch.no_grad():
        for i, layer in enumerate(merged.model.layers):
            for p in PROJECTIONS:
                a, b = factors[i][p]
                getattr(layer.self_attn, f"{p}_proj").weight += (a @ final[i][p] @ b).T
    gen = next(r for r in plora["logs"] if r.get("event") == "generate")
    ids = torch.tensor([gen["prompt_ids"]])
    assert gen["prompt_ids"] == plora["ctx"].parties[0].eval[0, :5].tolist()
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([ids, merged(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert gen["generated_ids"] == ids[0, 5:].tolist()


def test_messages_and_bytes_per_generated_token(plora):
    from parties.privatelora.wire import generation_plan
    gen = [r for r in plora["index"] if r["meta"].get("mode") == "generate"]
    cfg = plora["init"].config
    plan = generation_plan(cfg, True, R1, R2, "float32", "party-0", 3, prompt_len=5, tokens=3)
    flat = [m for p in plan for m in p["messages"]]
    assert [(r["kind"], r["src"], r["dst"], r["meta"]) for r in gen] == \
        [(m["kind"], m["src"], m["dst"], m["meta"]) for m in flat]
    assert [r["bytes"] for r in gen] == [frame_bytes(m) for m in flat]
    decode = [r for r in gen if r["meta"].get("position", 5) >= 5 and r["kind"] in ("embed", "hidden")]
    assert len(gen) == 3 * (2 + 2 * L)          # prefill + 2 decode passes, 2L+2 messages each
    per_token = [r for r in gen[2 + 2 * L:2 * (2 + 2 * L)]]
    assert sum(_payload(r) for r in per_token) == 4 * (2 * D + L * 3 * (R1 + R2))
    assert len(decode) == 4


def test_capture_lets_the_cloud_solve_for_m(plora, ref):
    from safetensors.torch import load_file
    _, _, _, history = ref
    step = 2                      # the forward of step 2 runs with M after two updates
    for layer in range(L):
        down = next(r for r in plora["index"] if r["kind"] == "act_down" and r["step"] == step
                    and r["meta"]["mode"] == "train" and r["meta"]["layer"] == layer)
        up = next(r for r in plora["index"] if r["kind"] == "act_up" and r["step"] == step
                  and r["meta"]["mode"] == "train" and r["meta"]["layer"] == layer)
        assert (down["meta"]["quantity"], up["meta"]["quantity"]) == ("A_x", "M_A_x")
        tensors = load_file(str(plora["capture"] / down["file"]))
        for p in PROJECTIONS:
            ax = tensors[down["tensors"][p]["key"]].reshape(-1, R1)
            max_ = tensors[up["tensors"][p]["key"]].reshape(-1, R2)
            m_hat = torch.linalg.lstsq(ax, max_).solution
            assert torch.allclose(m_hat, history[step - 1][layer][p], atol=1e-4)


def test_each_side_holds_only_its_parts(plora):
    cfg, init = plora["init"].config, plora["init"]
    mem = plora["stats"]["memory"]
    dims = projection_dims(cfg)
    ends = 2 * VOCAB * D + L * 3 * R1 * R2
    assert mem["party-0"]["params"] == 4 * ends
    layer_params = sum(p.numel() for p in init.model.layers.parameters())
    ab = L * sum(D * R1 + R2 * w for w in dims.values())
    assert mem["cloud"]["params"] == 4 * (layer_params + D + ab)
    assert mem["party-0"]["grads"] == 4 * L * 3 * R1 * R2
    assert mem["cloud"]["grads"] == 0 and mem["cloud"]["activations"] > 0


def test_full_hidden_split_is_the_same_function_with_more_bytes(plora, tmp_path):
    full = run_engine(scenario(), name="privatelora_full", tmp_path=tmp_path)
    a = [r["loss"] for r in plora["logs"] if r.get("event") == "train"]
    b = [r["loss"] for r in full["logs"] if r.get("event") == "train"]
    assert b == pytest.approx(a, rel=1e-5)
    dims = projection_dims(plora["init"].config)
    rec = next(r for r in plora["logs"] if r.get("event") == "privatelora")
    assert rec["payload_bytes_per_token_per_layer"] == {"privatelora": 3 * (R1 + R2) * 4,
                                                       "full_hidden": (D + sum(dims.values())) * 4}

    def layer_payload(res):
        return sum(_payload(r) for r in res["index"] if r["kind"] in ("act_down", "act_up")
                   and r["meta"]["mode"] == "train" and r["step"] == 0)
    assert layer_payload(full) / layer_payload(plora) == rec["reduction_vs_full_hidden"] == 96 / 30
    x = next(r for r in full["index"] if r["kind"] == "act_down")
    assert list(x["tensors"]) == ["x"] and x["meta"]["quantity"] == "x" and x["meta"]["split"] == "full"


def test_wire_dtype_bfloat16_halves_the_payload(tmp_path):
    sc = scenario(training={"steps": 1, "batch_size": 2, "seq_len": 16, "eval_every": 1, "eval_batches": 1})
    sc["protocol"]["options"].update(wire_dtype="bfloat16", eval_base=False, generate_tokens=0)
    res = run_engine(sc, tmp_path=tmp_path)
    ups = [r for r in res["index"] if r["kind"] == "act_up"]
    assert ups and all(_payload(r) == 32 * 3 * R2 * 2 for r in ups if r["meta"]["mode"] == "train")
    assert all(t["dtype"] == "bfloat16" for r in res["index"] for t in r["tensors"].values())


@pytest.mark.parametrize("options,expect", [
    ({"rank": 0}, "rank: must be an integer >= 1 (got 0)"),
    ({"ranks": 4}, "ranks: unknown option"),
    ({"wire_dtype": "int8"}, "wire_dtype: must be one of float32, bfloat16, float16 (got 'int8')"),
    ({"prompt_len": 16}, "prompt_len: must be < training.seq_len 16 (got 16)"),
    ({"eval_base": "yes"}, "eval_base: must be true or false (got 'yes')"),
])
def test_bad_options_are_config_errors(options, expect):
    sc = scenario()
    sc["protocol"]["options"] = options
    with pytest.raises(ConfigError) as e:
        run_engine(sc)
    assert e.value.path == "protocol.options" and any(expect in p for p in e.value.problems)


def test_non_llama_model_is_rejected():
    sc = scenario(model={"family": "mixtral", "hidden_size": D, "num_layers": 1, "num_heads": 4,
                         "num_kv_heads": 2, "intermediate_size": 64, "num_experts": 2, "top_k": 1})
    with pytest.raises(ConfigError, match="needs a dense LLaMA model"):
        run_engine(sc)


def test_baselines_run_and_cloud_only_ships_raw_text(tmp_path):
    tr = {"steps": 2, "batch_size": 2, "seq_len": 16, "eval_every": 2, "eval_batches": 1}
    base = scenario(training=tr, parties={"count": 2, "device": "phone", "link": "5g"})
    finals = {}
    for name in ("lora", "device_only", "cloud_only"):
        res = run_engine(base, name=name, tmp_path=tmp_path)
        evals = [r for r in res["logs"] if r.get("event") == "eval"]
        assert {r["party"] for r in evals} == {"party-0", "party-1"}
        assert {r["step"] for r in evals} == {-1, 1}
        finals[name] = res
    co = finals["cloud_only"]
    from safetensors.torch import load_file
    data = [r for r in co["index"] if r["kind"] == "data"]
    assert len(data) == 4
    for r in data:
        sent = load_file(str(co["capture"] / r["file"]))[r["tensors"]["input_ids"]["key"]]
        truth = next(ids for party, step, ids in co["truth"] if party == r["src"] and step == r["step"])
        assert torch.equal(sent, truth)
    # device_only holds the whole model on the device; PrivateLoRA's device holds its ends only
    assert finals["device_only"]["stats"]["memory"]["party-0"]["params"] > \
        sum(p.numel() * 4 for p in finals["device_only"]["init"].parameters())


@pytest.mark.parametrize("path", ["scenarios/privatelora.yaml", "scenarios/privatelora-tiny.yaml"])
def test_scenarios_validate(path):
    sc = load_scenario(path)
    assert sc.protocol.name == "privatelora" and sc.model.family == "llama"


def test_public_base_tool_and_a_run_from_it(tmp_path):
    from parties.privatelora.pretrain import build_base, public_kinds
    from testbed.run.runner import run_scenario
    sc_dict = scenario(data={"kinds": ["patient_note"], "records": 16, "eval_fraction": 0.25,
                             "canaries": {"count": 0}, "tokenizer": {"vocab_size": 128}},
                       training={"steps": 1, "batch_size": 2, "seq_len": 16, "eval_every": 1, "eval_batches": 1},
                       capture={"enabled": False})
    sc = parse_scenario(sc_dict)
    assert "patient_note" not in public_kinds(sc)
    base = tmp_path / "base"
    rec = build_base(sc, base, steps=2, records=30, batch_size=2)
    assert rec["kinds"] == public_kinds(sc) and rec["steps"] == 2
    weights = next(base.glob("*.safetensors"))
    mtime = weights.stat().st_mtime_ns
    assert build_base(sc, base, steps=2, records=30, batch_size=2) == rec   # up to date: not rebuilt
    assert weights.stat().st_mtime_ns == mtime
    sc_dict["model"]["path"] = str(base)
    sc_dict["data"]["tokenizer"]["path"] = str(base / "tokenizer.json")
    path, summary = run_scenario(parse_scenario(sc_dict), runs_root=tmp_path / "runs", progress=False,
                                 cache_dir=None)
    p = summary["protocols"]["privatelora"]
    assert set(p["eval_loss"]) == {"party-0"} and p["messages"] > 0
    assert (path / "public" / "init-model" / "config.json").exists()
