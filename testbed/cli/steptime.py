"""``python -m testbed steptime``: PC-MoE training step time over a network, next to the baselines.

    python -m testbed steptime --model mixtral-8x7b --parties 4 --link wan --device a100
    python -m testbed steptime --link 5g --routing runs/pcmoe-4party-<stamp>   # measured routing
    python -m testbed steptime --sweep latency -o latency.png     # or bandwidth, parties
    python -m testbed steptime --json

Prints the time per mini-batch of PC-MoE (one party trains, the others serve its remote
experts), centralized training on one device, FedAvg and split learning on the same links,
the parts of the PC-MoE step, the memory each site needs, then every assumption.  The
models are :mod:`testbed.costs.steptime` and :mod:`testbed.costs.steptime_baselines`.
"""
import json

from parties.shapes import SHAPES, meta_model

from testbed.engine import devices, links
from testbed.errors import ConfigError, fmt_bytes
from testbed.costs.projection import DTYPE_BYTES, project
from testbed.costs.steptime import Deployment, MoEShape, Routing, mean_pcmoe_step, routing_from_run
from testbed.costs.steptime_baselines import centralized_step, fedavg_step, split_step

SWEEPS = {
    "latency": [0, 0.1, 0.5, 1, 2, 5, 10, 20, 50, 100],              # ms one way, party link
    "bandwidth": [10, 30, 100, 300, 1000, 3000, 10000, 100000],       # Mbit/s both directions
    "parties": [2, 3, 4, 5, 6, 7, 8, 16, 32, 64],
}
LABELS = {"centralized": "centralized (1 device)", "pcmoe": "PC-MoE", "fedavg": "FedAvg", "split": "split"}


def add_steptime_arguments(p):
    moe = [n for n in SHAPES if n != "llama-2-7b"]
    p.add_argument("--model", default="mixtral-8x7b", help=f"MoE shape: {', '.join(moe)}")
    p.add_argument("--parties", type=int, default=4, help="PC-MoE / FedAvg / split parties (default 4)")
    p.add_argument("--device", default="a100", help="every party's device profile (testbed/engine/devices.py)")
    p.add_argument("--link", default="wan", help="every party's link profile (testbed/engine/links.py)")
    p.add_argument("--coordinator-link", default="datacenter",
                   help="link of the coordinator / FedAvg aggregator / split server")
    p.add_argument("--latency-ms", type=float, help="override the party link's one-way latency (ms)")
    p.add_argument("--jitter-ms", type=float, help="override the party link's jitter std (ms)")
    p.add_argument("--bandwidth-mbps", type=float, help="override the party link's bandwidth, both directions")
    p.add_argument("--batch", type=int, default=1, help="sequences per mini-batch (default 1)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--dtype", default="bfloat16", help=f"weights, activations and wire ({', '.join(DTYPE_BYTES)})")
    p.add_argument("--routing", metavar="RUN_DIR",
                   help="use the expert shares measured in a PC-MoE run directory (default: uniform)")
    p.add_argument("--local-steps", type=int, default=2, help="FedAvg local steps per round (default 2)")
    p.add_argument("--cut", type=int, default=1, help="split learning: blocks on the party (default 1)")
    p.add_argument("--engine-flops", action="store_true",
                   help="the embedded engine's flops-mode accounting: matmul FLOPs only (no attention "
                        "scores, no memory traffic)")
    p.add_argument("--sweep", choices=list(SWEEPS), help="sweep latency, bandwidth or parties; needs -o")
    p.add_argument("-o", "--output", help="PNG path for --sweep")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _check(args):
    problems = []
    moe = [n for n in SHAPES if n != "llama-2-7b"]
    if args.model not in moe:
        problems.append(f"--model: unknown MoE shape {args.model!r}; valid: {', '.join(moe)}")
    for key, name, table in (("--device", args.device, devices.PROFILES), ("--link", args.link, links.PROFILES),
                             ("--coordinator-link", args.coordinator_link, links.PROFILES)):
        if name not in table:
            problems.append(f"{key}: unknown profile {name!r}; valid: {', '.join(table)}")
    for key, v in (("--parties", args.parties), ("--batch", args.batch), ("--seq-len", args.seq_len),
                   ("--local-steps", args.local_steps)):
        if v < 1:
            problems.append(f"{key}: must be >= 1 (got {v})")
    for key, v in (("--latency-ms", args.latency_ms), ("--jitter-ms", args.jitter_ms)):
        if v is not None and v < 0:
            problems.append(f"{key}: must be >= 0 (got {v:g})")
    if args.bandwidth_mbps is not None and args.bandwidth_mbps <= 0:
        problems.append(f"--bandwidth-mbps: must be > 0 (got {args.bandwidth_mbps:g})")
    if args.dtype not in DTYPE_BYTES:
        problems.append(f"--dtype: unknown dtype {args.dtype!r}; valid: {', '.join(DTYPE_BYTES)}")
    if args.sweep and not args.output:
        problems.append("--sweep: needs -o PATH for the plot")
    if problems:
        raise ConfigError("command line", problems)


def _deployment(args, **over):
    link = links.PROFILES[args.link]
    upd = {k: v for k, v in (("latency_ms", args.latency_ms), ("jitter_ms", args.jitter_ms)) if v is not None}
    if args.bandwidth_mbps is not None:
        upd.update(up_mbps=args.bandwidth_mbps, down_mbps=args.bandwidth_mbps)
    upd.update(over)
    return Deployment(devices.PROFILES[args.device], link.model_copy(update=upd),
                      links.PROFILES[args.coordinator_link])


def evaluate(args, shape, routing, dep, n):
    """{scheme: result} for one deployment and party count."""
    if args.cut >= shape.layers:
        raise ConfigError("command line", [f"--cut: must be < the model's {shape.layers} layers (got {args.cut})"])
    if n > shape.num_experts:
        raise ConfigError("command line", [f"--parties: at most {shape.num_experts} (one expert per "
                                           f"party per layer; got {n})"])
    kw = dict(count_attention=not args.engine_flops, memory_traffic=not args.engine_flops)
    b, s = args.batch, args.seq_len
    return {"centralized": centralized_step(shape, dep.party_device, b, s, **kw),
            "pcmoe": mean_pcmoe_step(shape, dep, n, routing, b, s, **kw),
            "fedavg": fedavg_step(shape, dep, n, b, s, local_steps=args.local_steps, **kw),
            "split": split_step(shape, dep, b, s, cut=args.cut, **kw)}


def assumptions(args, shape, routing, dep, mem):
    p, c, d = dep.party_link, dep.coordinator_link, dep.party_device
    return [
        f"model {args.model}: {shape.layers} MoE layers, H={shape.hidden}, q={shape.q_dim}, kv={shape.kv_dim}, "
        f"{shape.num_experts} experts (I={shape.expert_intermediate}) top-{shape.top_k}, vocab {shape.vocab}; "
        f"{(shape.backbone_params + shape.expert_params) / 1e9:.2f} B parameters (meta device, parties/shapes.py)",
        f"mini-batch: {args.batch} x {args.seq_len} = {args.batch * args.seq_len} tokens; weights, activations "
        f"and wire tensors in {args.dtype}; AdamW",
        f"device {d.name}: {d.flops / 1e12:g} TFLOP/s, {d.mem_bw / 1e9:g} GB/s, {d.memory / 2**30:g} GiB, for "
        "every party (and the split server); a side's time = max(FLOPs/peak, bytes/bandwidth)",
        ("compute: the embedded engine's flops-mode accounting -- matmul FLOPs only (2 per MAC, backward = "
         "2 x forward), no attention scores, no memory traffic" if args.engine_flops else
         "compute: 2 FLOPs per MAC of every projection, router, routed pair (3*H*I) and the LM head, "
         "4*S*q per token for attention scores and values, backward = 2 x forward; memory: weights read "
         "3x per step + AdamW's 7 x weight bytes"),
        f"links: party {args.link} up {p.up_mbps:g} / down {p.down_mbps:g} Mbit/s, {p.latency_ms:g} ms one way, "
        f"jitter {p.jitter_ms:g} ms; coordinator {args.coordinator_link} up {c.up_mbps:g} / down "
        f"{c.down_mbps:g} Mbit/s, {c.latency_ms:g} ms; serialization at min(sender up, receiver down), "
        "FIFO per direction, then both one-way latencies + mean |N(0, jitter)|; no loss",
        f"PC-MoE: {args.parties} parties, round-robin expert shards (party i hosts e mod n = i); one "
        "party trains per step; per MoE layer the owner sends one message per remote host and waits for "
        "every reply, in forward and again in backward (4 messages per layer per remote host, 2 sequential "
        "exchanges per layer); exact codec framing; step averaged over which party owns it; plus the "
        "coordinator's turn and the party's done",
        f"routing: {routing.source} (rows per expert = tokens x top-k x share, rounded)",
        f"FedAvg: {args.local_steps} local steps per round on a full copy, all {args.parties} parties in "
        "parallel, weight deltas up and the mean down through the coordinator's link; per mini-batch = "
        f"round / ({args.parties} x {args.local_steps})",
        f"split: cut after block {args.cut}, activations [T, H] + int64 labels up, their gradient down, "
        "through the coordinator link; one party batch at a time",
        f"memory (testbed/costs/projection.py): centralized {fmt_bytes(mem['centralized']['total'])}, PC-MoE "
        f"party {fmt_bytes(mem['party']['total'])} (FedAvg holds the centralized figure on every party)",
    ]


def main_steptime(args):
    _check(args)
    shape = MoEShape.from_model(meta_model(args.model), DTYPE_BYTES[args.dtype])
    routing = routing_from_run(args.routing, shape) if args.routing else Routing.uniform(shape)
    if args.sweep:
        return _sweep(args, shape, routing)
    dep = _deployment(args)
    res = evaluate(args, shape, routing, dep, args.parties)
    mem = project(meta_model(args.model), args.parties, args.batch, args.seq_len, args.dtype)
    lines = assumptions(args, shape, routing, dep, mem)
    if args.json:
        print(json.dumps({"results": res, "memory": {"centralized": mem["centralized"], "party": mem["party"]},
                          "assumptions": lines}, indent=2))
        return 0
    mems = {"centralized": mem["centralized"]["total"], "pcmoe": mem["party"]["total"],
            "fedavg": mem["centralized"]["total"], "split": None}
    print(f"{'scheme':<26}{'s / mini-batch':>15}{'compute s':>12}{'wait s':>12}{'MB / mini-batch':>17}"
          f"{'memory/site':>14}")
    for name, r in res.items():
        # PC-MoE: compute summed over the owner and its hosts; "wait" is the owner's time in
        # expert exchanges and control (host compute runs inside it, hosts in parallel)
        comp = r.get("compute_s", r.get("owner_compute_s", 0) + r.get("host_compute_s", 0))
        net = r.get("network_s", r["total_s"] - r.get("owner_compute_s", 0))
        m = mems[name]
        fits = "" if m is None or m <= dep.party_device.memory else " (too big)"
        label = LABELS[name] + (f" ({args.local_steps} local)" if name == "fedavg" else "") \
            + (f" (cut {args.cut})" if name == "split" else "")
        print(f"{label:<26}{r['total_s']:>15.3f}{comp:>12.3f}{net:>12.3f}{r['bytes'] / 1e6:>17.1f}"
              f"{(fmt_bytes(m) if m else '-'):>14}{fits}")
    p, c = res["pcmoe"], res["centralized"]
    print(f"\nPC-MoE step: owner compute {p['owner_compute_s']:.3f} s, expert exchanges forward "
          f"{p['expert_fwd_s']:.3f} s + backward {p['expert_bwd_s']:.3f} s (host compute inside them "
          f"{p['host_compute_s']:.3f} s), control {p['control_s'] * 1e3:.1f} ms; "
          f"{p['sequential_round_trips']:.0f} sequential exchanges, {p['messages']:.0f} messages per step; "
          f"{p['total_s'] / c['total_s']:.1f}x centralized")
    print("\nassumptions:")
    for line in lines:
        print(f"  - {line}")
    return 0


def _sweep(args, shape, routing):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = SWEEPS[args.sweep]
    if args.sweep == "parties":
        xs = [x for x in xs if x <= shape.num_experts]
    series = {name: [] for name in LABELS}
    for x in xs:
        over = {"latency": {"latency_ms": x, "jitter_ms": 0.0}, "bandwidth": {"up_mbps": x, "down_mbps": x},
                "parties": {}}[args.sweep]
        res = evaluate(args, shape, routing, _deployment(args, **over),
                       x if args.sweep == "parties" else args.parties)
        for name in LABELS:
            series[name].append(res[name]["total_s"])
    unit = {"latency": f"{args.link} one-way latency (ms, no jitter)",
            "bandwidth": f"{args.link} bandwidth, both directions (Mbit/s)", "parties": "parties"}[args.sweep]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for name in LABELS:
        ax.plot(xs, series[name], marker="o", ms=3, label=LABELS[name])
    ax.set(yscale="log", xlabel=unit, ylabel="seconds per mini-batch",
           title=f"{args.model}, {args.device}, {args.batch}x{args.seq_len} tokens")
    if args.sweep == "latency":
        ax.set_xscale("symlog", linthresh=0.1)
    elif args.sweep == "bandwidth":
        ax.set_xscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    plt.close(fig)
    print(f"{args.sweep:>10}  " + "  ".join(f"{LABELS[n]:>24}" for n in LABELS))
    for i, x in enumerate(xs):
        print(f"{x:>10g}  " + "  ".join(f"{series[n][i]:>24.3f}" for n in LABELS))
    print(f"plot: {args.output}")
    return 0
