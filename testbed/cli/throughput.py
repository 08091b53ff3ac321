"""``python -m testbed throughput``: PrivateLoRA serving throughput for real shapes and networks.

    python -m testbed throughput --model llama-2-7b --device phone --cloud a100 --link 5g --rank 64
    python -m testbed throughput --model llama-30b --paper --device-bits 4      # paper's accounting too
    python -m testbed throughput --latency-ms 2 --jitter-ms 0 --batch 8 --cloud-tps 900
    python -m testbed throughput --sweep rank-c2d -o /tmp/rank.png   # rank, rank-c2d, rank-d2c,
                                                                     # bandwidth, latency

Prints prefill and decode tokens/s of device-only, cloud-only, PrivateLoRA and the
full-hidden split (see :mod:`testbed.costs.throughput` for the model and
:mod:`testbed.costs.serving` for ``--paper`` and the break-even RTT), the device-memory
breakdown, the round-trip time below which PrivateLoRA beats device-only, then every
assumption.
"""
import json
from dataclasses import replace

from testbed.engine import devices, links
from testbed.errors import ConfigError
from testbed.costs.serving import break_even_rtt, compare, paper_kwargs, rank_sweep
from testbed.costs.throughput import MODELS, SCHEMES, Setup, Shapes, evaluate, llama_config

SWEEPS = {
    "rank": [4, 8, 16, 32, 64, 128, 256, 512, 1024],
    "rank-c2d": [4, 8, 16, 32, 64, 128, 256, 512, 1024],
    "rank-d2c": [4, 8, 16, 32, 64, 128, 256, 512, 1024],
    "bandwidth": [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10000],   # Mbit/s, both directions
    "latency": [0, 0.01, 0.1, 0.3, 1, 2, 5, 10, 20, 50, 100],        # ms one way, device link
}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32"}   # one spelling across commands, old one accepted
LABELS = {"device_only": "device only", "cloud_only": "cloud only", "privatelora": "PrivateLoRA",
          "full_hidden": "full-hidden split"}
MEMORY_PARTS = ("embedding", "lm_head", "M", "A_B", "decoder", "kv_cache")


def add_throughput_arguments(p):
    p.add_argument("--model", default="llama-2-7b", help=f"one of: {', '.join(MODELS)}")
    p.add_argument("--device", default="phone",
                   help=f"the device's hardware profile (default phone); valid: {', '.join(devices.PROFILES)}")
    p.add_argument("--cloud", default="a100",
                   help=f"the cloud's hardware profile (default a100); valid: {', '.join(devices.PROFILES)}")
    p.add_argument("--link", default="5g",
                   help=f"the device's link profile (default 5g); valid: {', '.join(links.PROFILES)}")
    p.add_argument("--cloud-link", default="datacenter",
                   help=f"the cloud's link profile (default datacenter); valid: {', '.join(links.PROFILES)}")
    p.add_argument("--rank", type=int, default=64, help="PrivateLoRA rank r (both directions)")
    p.add_argument("--r-d2c", type=int, help="device->cloud rank if different from --rank")
    p.add_argument("--prompt", type=int, default=512, help="prompt length P (prefill; decode context)")
    p.add_argument("--dtype", type=lambda v: DTYPE_ALIASES.get(v, v), choices=["bfloat16", "float32"],
                   default="bfloat16", help="precision of weights, KV cache and wire tensors: bfloat16 "
                                            "(default) or float32 (bf16 and fp32 are accepted too)")
    p.add_argument("--latency-ms", type=float, help="override the device link's one-way latency (ms)")
    p.add_argument("--jitter-ms", type=float, help="override the device link's jitter std (ms)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--device-bits", type=int, choices=[4, 8, 16],
                   help="weight bits of the device-only baseline (default: --dtype)")
    p.add_argument("--cloud-tps", type=float,
                   help="measured decode tokens/s of the cloud stack (all --batch sequences), "
                        "replacing its memory-bandwidth ceiling")
    p.add_argument("--overlap", action="store_true",
                   help="roofline max(compute, memory) per side instead of their sum")
    p.add_argument("--paper", action="store_true",
                   help="also print every scheme under the PrivateLoRA paper's accounting "
                        "(bandwidth-only link, payload only, no embedding/final-hidden transfer)")
    p.add_argument("--sweep", choices=list(SWEEPS), help="sweep a rank, bandwidth or latency; needs -o")
    p.add_argument("-o", "--output", help="PNG path for --sweep")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _setup(args, link=None):
    problems = []
    for key, name, table in (("--device", args.device, devices.PROFILES),
                             ("--cloud", args.cloud, devices.PROFILES),
                             ("--link", args.link, links.PROFILES),
                             ("--cloud-link", args.cloud_link, links.PROFILES)):
        if name not in table:
            problems.append(f"{key}: unknown profile {name!r}; valid: {', '.join(table)}")
    for key, v in (("--rank", args.rank), ("--prompt", args.prompt), ("--r-d2c", args.r_d2c or 1),
                   ("--batch", args.batch)):
        if v < 1:
            problems.append(f"{key}: must be >= 1 (got {v})")
    for key, v in (("--latency-ms", args.latency_ms), ("--jitter-ms", args.jitter_ms)):
        if v is not None and v < 0:
            problems.append(f"{key}: must be >= 0 (got {v:g})")
    if args.cloud_tps is not None and args.cloud_tps <= 0:
        problems.append(f"--cloud-tps: must be > 0 (got {args.cloud_tps:g})")
    if args.model not in MODELS:
        problems.append(f"--model: unknown model {args.model!r}; valid: {', '.join(MODELS)}")
    if args.sweep and not args.output:
        problems.append("--sweep: needs -o PATH for the plot")
    if problems:
        raise ConfigError("command line", problems)
    dl = link or links.PROFILES[args.link]
    over = {k: v for k, v in (("latency_ms", args.latency_ms), ("jitter_ms", args.jitter_ms)) if v is not None}
    if over and link is None:
        dl = dl.model_copy(update=over)
    return Setup(devices.PROFILES[args.device], devices.PROFILES[args.cloud], dl,
                 links.PROFILES[args.cloud_link], overlap=args.overlap, cloud_tps=args.cloud_tps)


def _kwargs(args):
    return dict(prompt_len=args.prompt, r_c2d=args.rank, r_d2c=args.r_d2c, batch=args.batch,
                weight_bits=args.device_bits)


def assumptions(args, shapes, setup):
    """The model's assumptions, as printed lines."""
    dl, cl, dv, cv = setup.device_link, setup.cloud_link, setup.device, setup.cloud
    c = shapes.config
    bits = f"{args.device_bits}-bit" if args.device_bits else args.dtype
    cloud = (f"cloud decode at the measured {args.cloud_tps:g} tokens/s (--cloud-tps; prefill and "
             "PrivateLoRA's A,B from the roofline)" if args.cloud_tps else
             "cloud from its roofline (no --cloud-tps)")
    return [
        f"model {args.model}: d={c.hidden_size}, layers={c.num_hidden_layers}, heads={c.num_attention_heads}"
        f"/{c.num_key_value_heads} kv, ffn={c.intermediate_size}, vocab={c.vocab_size}; "
        f"{shapes.weight_bytes() / 1e9:.2f} GB of weights at {args.dtype} (shapes from a meta-device model)",
        f"batch size {args.batch} (sequences decoded in lockstep), one request stream; weights, KV cache and "
        f"wire tensors in {args.dtype}; device-only weights at {bits} (KV cache at {args.dtype})",
        "side time = FLOPs/peak + bytes/bandwidth" + (" (roofline max with --overlap)" if args.overlap
                                                     else " (no overlap, as the embedded engine)")
        + f"; device {dv.name}: {dv.flops / 1e12:g} TFLOP/s, {dv.mem_bw / 1e9:g} GB/s, "
        f"{dv.memory / 2**30:g} GiB; cloud {cv.name}: {cv.flops / 1e12:g} TFLOP/s, {cv.mem_bw / 1e9:g} GB/s; "
        + cloud,
        "decode: one token per sequence at context P, every weight read once per pass, the KV cache "
        f"once per sequence (memory-bound); prefill: P={args.prompt} tokens in one pass "
        "(compute-bound, attention 4*P*P*d_q)",
        f"links: device {args.link} up {dl.up_mbps:g} / down {dl.down_mbps:g} Mbit/s, {dl.latency_ms:g} ms, "
        f"jitter {dl.jitter_ms:g} ms; cloud {args.cloud_link} up {cl.up_mbps:g} / down {cl.down_mbps:g} "
        f"Mbit/s, {cl.latency_ms:g} ms; a message serializes at min(sender up, receiver down), "
        "then pays both one-way latencies + mean |N(0, jitter)|; exact codec framing; no loss; "
        f"RTT = {setup.rtt_seconds() * 1e3:.3f} ms",
        "PrivateLoRA and full-hidden: sequential round trips -- per pass 1 embedding up, per layer "
        "1 down + 1 up, 1 final hidden down (2L+2 messages); cloud-only: prompt ids up once, "
        "token ids streamed down (latency paid once per stream); device-only: no network",
        f"PrivateLoRA rank r_c2d={args.rank}, r_d2c={args.r_d2c or args.rank}: A,B on the cloud, "
        "M on the device; LM head on the device, on the last position only",
        "device memory: weights and KV cache, no activations; 'paper' column counts what the "
        "PrivateLoRA paper counts (LM head + M; device-only: all its weights)",
        "--paper rows: the same model on a bandwidth-only link (latency and jitter 0), tensor payload "
        "only (no framing), no embedding upload or final-hidden download (2L messages per pass)",
    ]


def _row(label, r):
    fits = "" if r["fits_device"] else "  (does not fit)"
    d = r["decode_s"]
    return (f"{label:<28}{r['prefill_tokens_per_s']:>12.2f}{r['decode_tokens_per_s']:>11.2f}"
            f"{d['device'] * 1e3:>9.2f}{d['cloud'] * 1e3:>9.2f}{d['link'] * 1e3:>9.2f}"
            f"{r['decode_payload_bytes_per_token']:>12,.0f}{r['decode_framing_bytes_per_token']:>10,.0f}"
            f"{r['decode_messages_per_token']:>6}{r['device_memory'] / 1e9:>9.2f}{fits}")


def _memory_table(res):
    lines = [f"{'device memory (GB)':<22}" + "".join(f"{p:>10}" for p in (*MEMORY_PARTS, "total", "paper"))]
    for name in SCHEMES:
        m = res[name]["device_memory_breakdown"]
        lines.append(f"{LABELS[name]:<22}" + "".join(f"{m[p] / 1e9:>10.3f}"
                                                     for p in (*MEMORY_PARTS, "total", "paper")))
    return lines


def _break_even_line(be, bits):
    now = be["current_rtt_s"] * 1e3
    if be["rtt_s"] is None:
        return (f"break-even RTT: none -- PrivateLoRA's decode pass takes "
                f"{be['privatelora_pass_no_latency_s'] * 1e3:.2f} ms with no latency at all, device-only "
                f"({bits}) {be['device_only_pass_s'] * 1e3:.2f} ms (this link's RTT: {now:.3f} ms)")
    return (f"break-even RTT: PrivateLoRA decodes faster than device-only ({bits}) below "
            f"{be['rtt_s'] * 1e3:.3f} ms round trip ({be['round_trips_per_token']:g} sequential round "
            f"trips per token); this link's RTT is {now:.3f} ms, so it "
            + ("wins" if be["wins_now"] else "loses"))


def main_throughput(args):
    setup = _setup(args)
    shapes = Shapes.from_config(llama_config(args.model), 2 if args.dtype == "bfloat16" else 4)
    kw = _kwargs(args)
    if args.sweep:
        return _sweep(args, shapes, setup, kw)
    both = compare(shapes, setup, **kw)
    res = both["realistic"]
    be = {"realistic": break_even_rtt(shapes, setup, **kw),
          "paper": break_even_rtt(shapes, setup, **paper_kwargs(kw))}
    lines = assumptions(args, shapes, setup)
    if args.json:
        print(json.dumps({"results": res, "paper": both["paper"], "break_even": be,
                          "assumptions": lines}, indent=2))
        return 0
    print(f"{'scheme':<28}{'prefill t/s':>12}{'decode t/s':>11}{'dev ms':>9}{'cloud ms':>9}"
          f"{'link ms':>9}{'payload B/t':>12}{'frame B/t':>10}{'msgs':>6}{'dev GB':>9}")
    for name in SCHEMES:
        print(_row(LABELS[name] + (" (realistic)" if args.paper else ""), res[name]))
        if args.paper:
            print(_row(LABELS[name] + " (paper)", both["paper"][name]))
    p, f = res["privatelora"], res["full_hidden"]
    print(f"\nPrivateLoRA moves {f['decode_bytes_per_token'] / p['decode_bytes_per_token']:.1f}x fewer "
          f"bytes per decoded token than the full-hidden split; its decode is "
          f"{p['decode_tokens_per_s'] / res['device_only']['decode_tokens_per_s']:.2f}x device-only"
          + (f" ({both['paper']['privatelora']['decode_tokens_per_s'] / both['paper']['device_only']['decode_tokens_per_s']:.2f}x in paper mode)."
             if args.paper else "."))
    bits = f"{args.device_bits}-bit" if args.device_bits else args.dtype
    print(_break_even_line(be["realistic"], bits))
    if args.paper:
        print("  paper mode (no ends, no framing): " + _break_even_line(be["paper"], bits))
    print()
    print("\n".join(_memory_table(res)))
    print("\nassumptions:")
    for line in lines:
        print(f"  - {line}")
    return 0


def _sweep(args, shapes, setup, kw):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, series = SWEEPS[args.sweep], {name: ([], []) for name in SCHEMES}
    if args.paper:      # the whole sweep under the paper's accounting
        setup, kw = setup.without_latency(), paper_kwargs(kw)
    base, wire = setup.device_link, []
    for x in xs:
        link, over = None, {}
        if args.sweep == "bandwidth":
            link = base.model_copy(update={"up_mbps": x, "down_mbps": x})
        elif args.sweep == "latency":
            link = base.model_copy(update={"latency_ms": x, "jitter_ms": 0.0})
        elif args.sweep.startswith("rank"):
            d = args.sweep.removeprefix("rank").removeprefix("-") or "both"
            row = rank_sweep(shapes, setup, [x], d, **kw)[0]
            over = {"r_c2d": row["r_c2d"], "r_d2c": row["r_d2c"]}
        res = evaluate(shapes, replace(setup, device_link=link) if link else setup, **{**kw, **over})
        wire.append(res["privatelora"]["decode_bytes_per_token"])
        for name in SCHEMES:
            series[name][0].append(res[name]["prefill_tokens_per_s"])
            series[name][1].append(res[name]["decode_tokens_per_s"])
    held = f"r_d2c={args.r_d2c or args.rank} held" if args.sweep == "rank-c2d" else f"r_c2d={args.rank} held"
    unit = {"rank": "rank r (both directions)", "rank-c2d": f"rank r_c2d of A·x ({held})",
            "rank-d2c": f"rank r_d2c of M·A·x ({held})",
            "bandwidth": f"{args.link} bandwidth, both directions (Mbit/s)",
            "latency": f"{args.link} one-way latency (ms, no jitter)"}[args.sweep]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, k, title in ((axes[0], 0, "prefill"), (axes[1], 1, "decode")):
        for name in SCHEMES:
            ax.plot(xs, series[name][k], marker="o", ms=3, label=LABELS[name])
        ax.set(yscale="log", xlabel=unit, ylabel="tokens/s",
               title=f"{title}: {args.model}, {args.device} + {args.cloud}, {args.link}"
               + (" (paper)" if args.paper else ""))
        if args.sweep == "latency":
            ax.set_xscale("symlog", linthresh=0.01)
        else:
            ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    plt.close(fig)
    print(f"{args.sweep:>10}  " + "  ".join(f"{LABELS[n] + ' decode':>24}" for n in SCHEMES)
          + f"{'PrivateLoRA B/token':>22}")
    for i, x in enumerate(xs):
        print(f"{x:>10g}  " + "  ".join(f"{series[n][1][i]:>24.2f}" for n in SCHEMES) + f"{wire[i]:>22,.0f}")
    print(f"plot: {args.output}")
    return 0
