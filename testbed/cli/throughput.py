"""``python -m testbed throughput``: PrivateLoRA serving throughput for real shapes and networks.

    python -m testbed throughput --model llama-2-7b --device phone --cloud a100 --link 5g --rank 64
    python -m testbed throughput --sweep rank -o /tmp/rank.png
    python -m testbed throughput --sweep bandwidth -o /tmp/bw.png     # or --sweep latency

Prints prefill and decode tokens/s of device-only, cloud-only, PrivateLoRA and the
full-hidden split (see :mod:`testbed.costs.throughput` for the model), then every assumption.
"""
import json

from testbed.engine import devices, links
from testbed.errors import ConfigError
from testbed.costs.throughput import MODELS, SCHEMES, Setup, Shapes, evaluate, llama_config

SWEEPS = {
    "rank": [4, 8, 16, 32, 64, 128, 256, 512, 1024],
    "bandwidth": [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10000],   # Mbit/s, both directions
    "latency": [0.01, 0.1, 0.3, 1, 2, 5, 10, 20, 50, 100],           # ms one way, device link
}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32"}   # one spelling across commands, old one accepted
LABELS = {"device_only": "device only", "cloud_only": "cloud only", "privatelora": "PrivateLoRA",
          "full_hidden": "full-hidden split"}


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
    p.add_argument("--overlap", action="store_true",
                   help="roofline max(compute, memory) per side instead of their sum")
    p.add_argument("--sweep", choices=sorted(SWEEPS), help="sweep rank, bandwidth or latency; "
                                                           "needs -o")
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
    for key, v in (("--rank", args.rank), ("--prompt", args.prompt), ("--r-d2c", args.r_d2c or 1)):
        if v < 1:
            problems.append(f"{key}: must be >= 1 (got {v})")
    if args.model not in MODELS:
        problems.append(f"--model: unknown model {args.model!r}; valid: {', '.join(MODELS)}")
    if args.sweep and not args.output:
        problems.append("--sweep: needs -o PATH for the plot")
    if problems:
        raise ConfigError("command line", problems)
    return Setup(devices.PROFILES[args.device], devices.PROFILES[args.cloud],
                 link or links.PROFILES[args.link], links.PROFILES[args.cloud_link], overlap=args.overlap)


def assumptions(args, shapes, setup):
    """The model's assumptions, as printed lines."""
    dl, cl, dv, cv = setup.device_link, setup.cloud_link, setup.device, setup.cloud
    c = shapes.config
    return [
        f"model {args.model}: d={c.hidden_size}, layers={c.num_hidden_layers}, heads={c.num_attention_heads}"
        f"/{c.num_key_value_heads} kv, ffn={c.intermediate_size}, vocab={c.vocab_size}; "
        f"{shapes.weight_bytes() / 1e9:.2f} GB of weights at {args.dtype} (shapes from a meta-device model)",
        "batch size 1, one request; weights, KV cache and wire tensors in " + args.dtype,
        "side time = FLOPs/peak + bytes/bandwidth" + (" (roofline max with --overlap)" if args.overlap
                                                     else " (no overlap, as the embedded engine)")
        + f"; device {dv.name}: {dv.flops / 1e12:g} TFLOP/s, {dv.mem_bw / 1e9:g} GB/s; "
        f"cloud {cv.name}: {cv.flops / 1e12:g} TFLOP/s, {cv.mem_bw / 1e9:g} GB/s",
        "decode: one token at context P, every weight and the KV cache read once (memory-bound); "
        f"prefill: P={args.prompt} tokens in one pass (compute-bound, attention 4*P*P*d_q)",
        f"links: device {args.link} up {dl.up_mbps:g} / down {dl.down_mbps:g} Mbit/s, {dl.latency_ms:g} ms, "
        f"jitter {dl.jitter_ms:g} ms; cloud {args.cloud_link} up {cl.up_mbps:g} / down {cl.down_mbps:g} "
        f"Mbit/s, {cl.latency_ms:g} ms; a message serializes at min(sender up, receiver down), "
        "then pays both one-way latencies + mean |N(0, jitter)|; exact codec framing; no loss",
        "PrivateLoRA and full-hidden: sequential round trips -- per token 1 embedding up, per layer "
        "1 down + 1 up, 1 final hidden down (2L+2 messages); cloud-only: prompt ids up once, "
        "token ids streamed down (latency paid once per stream); device-only: no network",
        f"PrivateLoRA rank r_c2d={args.rank}, r_d2c={args.r_d2c or args.rank}: A,B on the cloud, "
        "M on the device; LM head on the device, on the last position only",
    ]


def _row(name, r):
    fits = "" if r["fits_device"] else "  (does not fit the device)"
    d = r["decode_s"]
    return (f"{LABELS[name]:<18}{r['prefill_tokens_per_s']:>12.2f}{r['decode_tokens_per_s']:>12.2f}"
            f"{d['device'] * 1e3:>11.2f}{d['cloud'] * 1e3:>10.2f}{d['link'] * 1e3:>10.2f}"
            f"{r['decode_bytes_per_token']:>13,}{r['decode_messages_per_token']:>6}"
            f"{r['device_memory'] / 1e9:>10.2f}{fits}")


def main_throughput(args):
    setup = _setup(args)
    shapes = Shapes.from_config(llama_config(args.model), 2 if args.dtype == "bfloat16" else 4)
    kw = dict(prompt_len=args.prompt, r_c2d=args.rank, r_d2c=args.r_d2c)
    if args.sweep:
        return _sweep(args, shapes, kw)
    res = evaluate(shapes, setup, **kw)
    if args.json:
        print(json.dumps({"results": res, "assumptions": assumptions(args, shapes, setup)}, indent=2))
        return 0
    print(f"{'scheme':<18}{'prefill t/s':>12}{'decode t/s':>12}{'dev ms':>11}{'cloud ms':>10}"
          f"{'link ms':>10}{'wire B/tok':>13}{'msgs':>6}{'dev GB':>10}")
    for name in SCHEMES:
        print(_row(name, res[name]))
    p, f = res["privatelora"], res["full_hidden"]
    print(f"\nPrivateLoRA moves {f['decode_bytes_per_token'] / p['decode_bytes_per_token']:.1f}x fewer "
          f"bytes per decoded token than the full-hidden split; its decode is "
          f"{p['decode_tokens_per_s'] / res['device_only']['decode_tokens_per_s']:.2f}x device-only.")
    print("\nassumptions:")
    for line in assumptions(args, shapes, setup):
        print(f"  - {line}")
    return 0


def _sweep(args, shapes, kw):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, series = SWEEPS[args.sweep], {name: ([], []) for name in SCHEMES}
    base = links.PROFILES[args.link]
    for x in xs:
        link = None
        if args.sweep == "bandwidth":
            link = base.model_copy(update={"up_mbps": x, "down_mbps": x})
        elif args.sweep == "latency":
            link = base.model_copy(update={"latency_ms": x, "jitter_ms": 0.0})
        res = evaluate(shapes, _setup(args, link), **{**kw, **({"r_c2d": x} if args.sweep == "rank" else {})})
        for name in SCHEMES:
            series[name][0].append(res[name]["prefill_tokens_per_s"])
            series[name][1].append(res[name]["decode_tokens_per_s"])
    unit = {"rank": "rank r", "bandwidth": f"{args.link} bandwidth, both directions (Mbit/s)",
            "latency": f"{args.link} one-way latency (ms, no jitter)"}[args.sweep]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, k, title in ((axes[0], 0, "prefill"), (axes[1], 1, "decode")):
        for name in SCHEMES:
            ax.plot(xs, series[name][k], marker="o", ms=3, label=LABELS[name])
        ax.set(xscale="log", yscale="log", xlabel=unit, ylabel="tokens/s",
               title=f"{title}: {args.model}, {args.device} + {args.cloud}, {args.link}")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    plt.close(fig)
    print(f"{args.sweep:>10}  " + "  ".join(f"{LABELS[n] + ' decode':>24}" for n in SCHEMES))
    for i, x in enumerate(xs):
        print(f"{x:>10g}  " + "  ".join(f"{series[n][1][i]:>24.2f}" for n in SCHEMES))
    print(f"plot: {args.output}")
    return 0
