"""``python -m testbed memory``: projected training memory per PC-MoE party vs centralized.

    python -m testbed memory --model mixtral-8x7b --parties 4
    python -m testbed memory --model all --batch 4 --seq-len 2048 --dtype bfloat16 --json

The architecture is instantiated on the meta device from published config numbers
(:mod:`parties.shapes`; nothing is downloaded or allocated); the math and its
assumptions are in :mod:`testbed.costs.projection`.
"""
import json

from parties.shapes import SHAPES, meta_model

from testbed.errors import ConfigError, fmt_bytes
from testbed.costs.projection import DTYPE_BYTES, assumption_lines, project


def add_memory_arguments(p):
    p.add_argument("--model", default="mixtral-8x7b",
                   help=f"model shape, or 'all' (valid: {', '.join(SHAPES)})")
    p.add_argument("--parties", type=int, default=4, help="number of PC-MoE parties (default 4)")
    p.add_argument("--batch", type=int, default=1, help="sequences per mini-batch (default 1)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--dtype", default="bfloat16", help=f"parameter/activation dtype ({', '.join(DTYPE_BYTES)})")
    p.add_argument("--optimizer-dtype", default=None,
                   help="dtype of the two AdamW moments (default: same as --dtype)")
    p.add_argument("--json", action="store_true", help="print the projection as JSON")


def format_projection(name, r):
    """A small table for the terminal."""
    p = r["params"]
    lines = [f"{name}: {p['total'] / 1e9:.2f} B parameters, experts {p['expert_share']:.1%} "
             f"({r['shape']['num_experts']} per layer, top-{r['shape']['top_k']}); "
             f"per party {p['party'] / 1e9:.2f} B "
             f"({r['hosted_experts_per_layer']} experts per layer hosted, {r['parties']} parties)"
             if r["shape"]["num_experts"] else
             f"{name}: {p['total'] / 1e9:.2f} B parameters, dense (no experts to shard)",
             f"  batch {r['batch']} x seq {r['seq_len']}, {r['dtype']} params/grads/activations, "
             f"AdamW moments in {r['optimizer_dtype']}",
             f"  {'':<14}{'params':>12}{'grads':>12}{'Adam':>12}{'activations':>14}{'total':>12}"]
    for row in ("centralized", "party"):
        m = r[row]
        label = "centralized" if row == "centralized" else "per party"
        lines.append(f"  {label:<14}{fmt_bytes(m['params']):>12}{fmt_bytes(m['grads']):>12}"
                     f"{fmt_bytes(m['optimizer']):>12}{fmt_bytes(m['activations']):>14}{fmt_bytes(m['total']):>12}")
    lines.append(f"  reduction per party vs centralized: {r['reduction']:.1%}")
    return "\n".join(lines)


def main_memory(args):
    names = list(SHAPES) if args.model == "all" else [args.model]
    problems = [f"--model: unknown model shape {n!r}; valid: {', '.join(SHAPES)}, all"
                for n in names if n not in SHAPES]
    if args.parties < 1:
        problems.append(f"--parties: must be >= 1 (got {args.parties})")
    if args.batch < 1 or args.seq_len < 1:
        problems.append(f"--batch/--seq-len: must be >= 1 (got {args.batch}, {args.seq_len})")
    for flag, d in (("--dtype", args.dtype), ("--optimizer-dtype", args.optimizer_dtype)):
        if d is not None and d not in DTYPE_BYTES:
            problems.append(f"{flag}: unknown dtype {d!r}; valid: {', '.join(DTYPE_BYTES)}")
    if problems:
        raise ConfigError("command line", problems)
    results = {n: project(meta_model(n), args.parties, args.batch, args.seq_len, args.dtype,
                          args.optimizer_dtype) for n in names}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print("\n\n".join(format_projection(n, r) for n, r in results.items()))
    print("\nassumptions (testbed/costs/projection.py; also in --json output):")
    print(f"  - shapes: published config.json numbers on the meta device (parties/shapes.py); "
          f"{args.parties} parties, batch {args.batch} x seq {args.seq_len}, {args.dtype} parameters, "
          f"gradients and activations, AdamW moments in {args.optimizer_dtype or args.dtype}")
    for line in assumption_lines():
        print(f"  - {line}")
    return 0
