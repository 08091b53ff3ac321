"""Tests for the analytic throughput model (testbed/costs/throughput.py) and its CLI.

The model must agree with the embedded engine running the PrivateLoRA protocol on the
same shapes, profiles and links: bytes exactly, simulated time within 10%.
"""
import json
import math

import pytest
import torch
from test_privatelora import R1, R2, run_engine, scenario

from testbed.engine import codec, devices, links
from parties.privatelora.wire import pass_plan
from testbed.cli import main
from testbed.scenario import LinkCfg
from testbed.costs.throughput import (Setup, Shapes, evaluate, frame_bytes, generation_seconds, llama_config,
                                pass_cost)

P, N = 5, 3
STEPS = 1


def test_frame_bytes_is_the_codecs_frame_size():
    msgs = [codec.Message(kind="act_down", src="cloud", dst="party-0", step=12,
                          meta={"layer": 3, "projections": ["q", "k", "v"], "x": None},
                          tensors={p: torch.zeros(1, 7, 64, dtype=torch.bfloat16) for p in "qkv"}),
            codec.Message(kind="token", src="cloud", dst="party-10", step=-1, meta={},
                          tensors={"token": torch.zeros(1, 1, dtype=torch.int64)}),
            codec.Message(kind="empty", step=0)]
    for m in msgs:
        spec = {"kind": m.kind, "src": m.src, "dst": m.dst, "step": m.step, "meta": m.meta,
                "tensors": {n: (str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in m.tensors.items()}}
        assert frame_bytes(spec) == len(codec.encode(m))


def test_llama_2_7b_shapes_and_device_only_decode_golden():
    s = Shapes.from_config(llama_config("llama-2-7b"), dtype_bytes=2)
    assert s.weight_bytes() == 2 * 6_738_415_616          # LLaMA-2-7B's published parameter count
    setup = Setup(devices.PROFILES["phone"], devices.PROFILES["a100"], links.PROFILES["5g"],
                  links.PROFILES["datacenter"])
    res = evaluate(s, setup, prompt_len=512, r_c2d=64)
    kv = 2 * 513 * 4096 * 2 * 32
    flops = 32 * (2 * s.layer_linear_macs + 4 * 513 * 4096) + 2 * 4096 * 32000
    read = s.weight_bytes() - 32000 * 4096 * 2 + 4096 * 2 + kv   # embeddings: one row read
    assert res["device_only"]["decode_s"]["total"] == pytest.approx(flops / 4e12 + read / 42.7e9, rel=1e-12)
    assert not res["device_only"]["fits_device"] and res["privatelora"]["fits_device"]
    # per decoded token PrivateLoRA carries 2d + L*3*(r_c2d + r_d2c) elements in 2L+2 messages;
    # the full-hidden split 2d + L*(d + d_q + d_k + d_v)
    for lowrank, elements in ((True, 2 * 4096 + 32 * 3 * 128), (False, 2 * 4096 + 32 * 4 * 4096)):
        plan = pass_plan(s.config, lowrank, 64, 64, "bfloat16", "party-0", 0, 1, 512)
        assert len(plan) == 66
        assert sum(math.prod(shape) for m in plan for _, shape in m["tensors"].values()) == elements
        cost = pass_cost(s, "privatelora" if lowrank else "full_hidden", 1, 513, r_c2d=64, start=512)
        assert [n for *_, n in cost.messages] == [frame_bytes(m) for m in plan]
    assert res["privatelora"]["decode_messages_per_token"] == 66


def _engine_vs_model(name, scheme, device, cloud, dev_link, cloud_link, tmp_path):
    sc = scenario(parties={"count": 1, "device": device, "link": dev_link},
                  coordinator={"device": cloud, "link": cloud_link}, compute={"mode": "flops"},
                  training={"steps": STEPS, "batch_size": 2, "seq_len": 16, "eval_every": 1, "eval_batches": 1})
    sc["protocol"]["options"].update(prompt_len=P, generate_tokens=N)
    res = run_engine(sc, name=name, tmp_path=tmp_path)
    logs = res["logs"]
    t0 = next(r["sim_time"] for r in logs if r.get("event") == "generate_start")
    t1 = next(r["sim_time"] for r in logs if r.get("event") == "generate")
    shapes = Shapes.from_config(res["init"].config, dtype_bytes=4)
    link = (lambda x: links.resolve_link(x))
    setup = Setup(devices.PROFILES[device], devices.PROFILES[cloud], link(dev_link), link(cloud_link))
    kw = dict(step=STEPS, r_c2d=R1, r_d2c=R2)
    exact = generation_seconds(shapes, scheme, setup, P, N, count_attention=False, **kw)
    full = generation_seconds(shapes, scheme, setup, P, N, count_attention=True, **kw)
    # bytes: every generation message as the analytic model frames it
    gen = [r["bytes"] for r in res["index"] if r["meta"].get("mode") == "generate"]
    model_bytes, start, q = [], 0, P
    for _ in range(N):
        model_bytes += [n for *_, n in pass_cost(shapes, scheme, q, start + q, start=start, **kw).messages]
        start, q = start + q, 1
    assert gen == model_bytes
    return t1 - t0, exact, full


@pytest.mark.parametrize("name,scheme", [("privatelora", "privatelora"), ("privatelora_full", "full_hidden")])
def test_engine_agrees_with_the_model_on_phone_a100_5g(name, scheme, tmp_path):
    no_jitter_5g = {"up_mbps": 60, "down_mbps": 100, "latency_ms": 10}
    sim, exact, full = _engine_vs_model(name, scheme, "phone", "a100", no_jitter_5g, "datacenter", tmp_path)
    print(f"{name} phone+a100+5g: engine {sim:.6f}s model {exact:.6f}s (with attention {full:.6f}s)")
    assert sim == pytest.approx(exact, rel=1e-6)
    assert abs(full - sim) / sim < 0.10


def test_engine_agrees_with_the_model_when_compute_dominates(tmp_path):
    sim, exact, full = _engine_vs_model("privatelora", "privatelora", "host", "host", "ideal", "ideal", tmp_path)
    print(f"privatelora host+host+ideal: engine {sim:.3e}s model {exact:.3e}s (with attention {full:.3e}s), "
          f"discrepancy {abs(full - sim) / sim:.2%}")
    assert sim == pytest.approx(exact, rel=1e-6)
    assert abs(full - sim) / sim < 0.10


def test_jitter_is_modelled_by_its_mean():
    s = Shapes.from_config(llama_config("tinyllama-1.1b"))
    j = LinkCfg(up_mbps=60, down_mbps=100, latency_ms=10, jitter_ms=2)
    a = Setup(devices.PROFILES["phone"], devices.PROFILES["a100"], j, links.PROFILES["datacenter"])
    b = Setup(devices.PROFILES["phone"], devices.PROFILES["a100"], j.model_copy(update={"jitter_ms": 0}),
              links.PROFILES["datacenter"])
    ta, tb = (generation_seconds(s, "privatelora", x, 8, 2) for x in (a, b))
    assert ta - tb == pytest.approx(2 * 46 * 2e-3 * (2 / torch.pi) ** 0.5, rel=1e-9)   # 2 passes x 46 msgs


def test_cli_table_json_and_sweeps(tmp_path, capsys):
    assert main(["throughput", "--model", "llama-2-7b", "--device", "phone", "--cloud", "a100",
                 "--link", "5g", "--rank", "64"]) == 0
    out = capsys.readouterr().out
    for label in ("device only", "cloud only", "PrivateLoRA", "full-hidden split", "assumptions:",
                  "batch size 1", "latency"):
        assert label in out
    assert main(["throughput", "--json", "--rank", "16"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert res["privatelora"]["decode_bytes_per_token"] < res["full_hidden"]["decode_bytes_per_token"]
    for sweep in ("rank", "bandwidth", "latency"):
        png = tmp_path / f"{sweep}.png"
        assert main(["throughput", "--sweep", sweep, "-o", str(png)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["throughput", "--model", "gpt-9", "--sweep", "rank"]) == 2
    err = capsys.readouterr().err
    assert "--model: unknown model 'gpt-9'" in err and "--sweep: needs -o PATH" in err


# -- the complete serving model: batch, quantized device-only, measured cloud, paper mode ---------

PHONE, A100 = devices.PROFILES["phone"], devices.PROFILES["a100"]
FIVE_G, DC = links.PROFILES["5g"], links.PROFILES["datacenter"]


def _7b():
    return Shapes.from_config(llama_config("llama-2-7b"), dtype_bytes=2)


def test_published_shapes_of_13b_30b_70b():
    counts = {"llama-2-13b": 13_015_864_320, "llama-30b": 32_528_943_616, "llama-2-70b": 68_976_648_192}
    for name, n in counts.items():
        assert Shapes.from_config(llama_config(name)).weight_bytes() == 2 * n


def test_batch_scales_compute_kv_and_wire_but_reads_weights_once():
    s, B, P = _7b(), 8, 512
    setup = Setup(PHONE, A100, FIVE_G, DC)
    one, many = evaluate(s, setup, prompt_len=P, r_c2d=64), evaluate(s, setup, prompt_len=P, r_c2d=64, batch=B)
    kv = 2 * (P + 1) * 4096 * 2 * 32
    flops = 32 * (2 * s.layer_linear_macs + 4 * (P + 1) * 4096) + 2 * 4096 * 32000
    read = s.weight_bytes() - 32000 * 4096 * 2 + B * 4096 * 2 + B * kv
    assert many["device_only"]["decode_s"]["total"] == pytest.approx(B * flops / 4e12 + read / 42.7e9, rel=1e-12)
    assert many["device_only"]["decode_tokens_per_s"] == pytest.approx(B / (B * flops / 4e12 + read / 42.7e9))
    # payload per token does not depend on the batch: (2d + L*3*(r_c2d + r_d2c)) bf16 elements
    for r in (one, many):
        assert r["privatelora"]["decode_payload_bytes_per_token"] == 2 * (2 * 4096 + 32 * 3 * 128)
    # framing: one header per message, shared by the batch -- the codec's own frame size
    m = codec.Message(kind="act_down", src="cloud", dst="party-0", step=0,
                      meta=pass_plan(s.config, True, 64, 64, "bfloat16", "party-0", 0, 1, P)[1]["meta"],
                      tensors={p: torch.zeros(B, 1, 64, dtype=torch.bfloat16) for p in "qkv"})
    assert len(codec.encode(m)) == pass_cost(s, "privatelora", 1, P + 1, start=P, batch=B).messages[1][2]
    framing = sum(n for *_, n in pass_cost(s, "privatelora", 1, P + 1, start=P, batch=B).messages) \
        - B * 2 * (2 * 4096 + 32 * 3 * 128)
    assert many["privatelora"]["decode_framing_bytes_per_token"] == pytest.approx(framing / B, rel=1e-12)
    assert many["privatelora"]["decode_bytes_per_token"] < one["privatelora"]["decode_bytes_per_token"]
    assert many["device_only"]["device_memory_breakdown"]["kv_cache"] == B * 32 * kv / 32


def test_device_bits_quantize_the_device_only_weights_only():
    s, P = _7b(), 512
    res = evaluate(s, Setup(PHONE, A100, FIVE_G, DC), prompt_len=P, weight_bits=4)
    kv = 2 * (P + 1) * 4096 * 2 * 32
    flops = 32 * (2 * s.layer_linear_macs + 4 * (P + 1) * 4096) + 2 * 4096 * 32000
    read = (s.weight_bytes() - 32000 * 4096 * 2 + 4096 * 2) / 4 + kv      # 4-bit weights, bf16 KV
    assert res["device_only"]["decode_s"]["total"] == pytest.approx(flops / 4e12 + read / 42.7e9, rel=1e-12)
    mem = res["device_only"]["device_memory_breakdown"]
    assert mem["paper"] == s.weight_bytes() / 4 and mem["total"] == s.weight_bytes() / 4 + kv
    assert res["device_only"]["fits_device"]
    # PrivateLoRA's device keeps bf16: embedding table, LM head and M
    pl = res["privatelora"]["device_memory_breakdown"]
    assert (pl["embedding"], pl["lm_head"], pl["M"]) == (32000 * 4096 * 2, 32000 * 4096 * 2, 32 * 3 * 64 * 64 * 2)
    assert pl["total"] == pl["embedding"] + pl["lm_head"] + pl["M"] and pl["paper"] == pl["lm_head"] + pl["M"]


def test_measured_cloud_tokens_per_second_replaces_the_cloud_roofline():
    s, B, tps = _7b(), 4, 900.0
    setup = Setup(PHONE, A100, FIVE_G, DC, cloud_tps=tps)
    res = evaluate(s, setup, prompt_len=64, batch=B)
    assert res["cloud_only"]["decode_s"]["cloud"] == pytest.approx(B / tps, rel=1e-12)
    ab = sum(4096 * 64 + 64 * w for w in s.dims.values())
    adapter = B * 32 * 2 * ab / 312e12 + 32 * ab * 2 / 1935e9
    assert res["privatelora"]["decode_s"]["cloud"] == pytest.approx(B / tps + adapter, rel=1e-12)
    roofline = evaluate(s, Setup(PHONE, A100, FIVE_G, DC), prompt_len=64, batch=B)
    assert res["cloud_only"]["prefill_s"] == roofline["cloud_only"]["prefill_s"]   # prefill unchanged


def test_paper_mode_is_bandwidth_only_payload_only_and_no_ends():
    from testbed.costs.serving import compare
    s = _7b()
    res = compare(s, Setup(PHONE, A100, FIVE_G, DC), prompt_len=512, r_c2d=64, r_d2c=32)["paper"]
    p = res["privatelora"]
    per_layer = 3 * 2 * (64 + 32)
    assert p["decode_bytes_per_token"] == p["decode_payload_bytes_per_token"] == 32 * per_layer
    assert p["decode_messages_per_token"] == 64 and p["decode_framing_bytes_per_token"] == 0
    # link time = serialization only: A·x down at 100 Mbit/s (5g down), M·A·x up at 60 Mbit/s
    assert p["decode_s"]["link"] == pytest.approx(32 * 3 * 2 * (64 * 8 / 100e6 + 32 * 8 / 60e6), rel=1e-12)


def test_break_even_rtt_is_where_privatelora_and_device_only_decode_equally():
    from testbed.costs.serving import break_even_rtt
    s = _7b()
    for bits in (None, 4):
        be = break_even_rtt(s, Setup(PHONE, A100, FIVE_G, DC), prompt_len=512, r_c2d=64, weight_bits=bits)
        assert be["round_trips_per_token"] == 33
        # put the deployment exactly at the break-even RTT (no jitter): both decode equally fast
        one_way = be["rtt_s"] / 2 * 1e3 - DC.latency_ms
        at = Setup(PHONE, A100, FIVE_G.model_copy(update={"latency_ms": one_way, "jitter_ms": 0}), DC)
        res = evaluate(s, at, prompt_len=512, r_c2d=64, weight_bits=bits)
        assert res["privatelora"]["decode_tokens_per_s"] == pytest.approx(
            res["device_only"]["decode_tokens_per_s"], rel=1e-9)
        assert at.rtt_seconds() == pytest.approx(be["rtt_s"], rel=1e-12)
    # a device fast enough that PrivateLoRA never wins
    fast = Setup(devices.PROFILES["h100"], A100, FIVE_G, DC)
    assert break_even_rtt(s, fast, prompt_len=512, r_c2d=64)["rtt_s"] is None


def test_rank_sweep_varies_one_direction_alone():
    from testbed.costs.serving import rank_sweep
    s, setup = _7b(), Setup(PHONE, A100, FIVE_G, DC)
    for direction, want in (("c2d", lambda r: (r, 16)), ("d2c", lambda r: (64, r)), ("both", lambda r: (r, r))):
        rows = rank_sweep(s, setup, [8, 128], direction, r_c2d=64, r_d2c=16, prompt_len=64)
        for row, r in zip(rows, (8, 128)):
            rc, rd = want(r)
            assert (row["r_c2d"], row["r_d2c"]) == (rc, rd)
            assert row["device_memory"] == 2 * (2 * 32000 * 4096 + 32 * 3 * rc * rd)
    with pytest.raises(ValueError, match="direction"):
        rank_sweep(s, setup, [8], "up")


def test_cli_paper_mode_overrides_breakdown_and_json(tmp_path, capsys):
    assert main(["throughput", "--model", "llama-30b", "--paper", "--device-bits", "4", "--latency-ms", "1",
                 "--jitter-ms", "0", "--batch", "2", "--cloud-tps", "500"]) == 0
    out = capsys.readouterr().out
    for label in ("PrivateLoRA (realistic)", "PrivateLoRA (paper)", "break-even RTT", "device memory (GB)",
                  "lm_head", "device-only weights at 4-bit", "1 ms, jitter 0 ms", "batch size 2", "500 tokens/s",
                  "--paper rows"):
        assert label in out, label
    assert main(["throughput", "--json", "--latency-ms", "0", "--jitter-ms", "0"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"results", "paper", "break_even", "assumptions"}
    assert doc["break_even"]["realistic"]["current_rtt_s"] == pytest.approx(2 * DC.latency_ms / 1e3)
    assert doc["results"]["privatelora"]["device_memory_breakdown"]["M"] == 32 * 3 * 64 * 64 * 2
    for sweep in ("rank-c2d", "rank-d2c"):
        png = tmp_path / f"{sweep}.png"
        assert main(["throughput", "--sweep", sweep, "-o", str(png)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    # paper-mode sweep of r_c2d alone: bytes per token 32 layers x 3 x bf16 x (r_c2d + 64)
    assert main(["throughput", "--sweep", "rank-c2d", "--paper", "-o", str(tmp_path / "p.png")]) == 0
    rows = {ln.split()[0]: ln.split()[-1] for ln in capsys.readouterr().out.splitlines()[1:-1]}
    assert rows["4"] == f"{32 * 3 * 2 * (4 + 64):,}" and rows["1024"] == f"{32 * 3 * 2 * (1024 + 64):,}"
    assert main(["throughput", "--batch", "0", "--latency-ms", "-1", "--cloud-tps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--batch: must be >= 1" in err and "--latency-ms: must be >= 0" in err and "--cloud-tps: must be > 0" in err
