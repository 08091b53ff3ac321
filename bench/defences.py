"""Privacy-utility table of the defences: attack success and held-out loss at three strengths.

For each protocol's scenario this runs the undefended protocol and each defence at each
strength (same seed, same data), attacks the capture with the attack that breaks that
protocol, and prints one Markdown table per defence: strength, mean held-out loss, and
the attack's token accuracy (and canary recovery where rows carried canaries).

    python bench/defences.py                      # every table (~10-20 min on 2 cores)
    python bench/defences.py --only fedsgd-topk   # one table
    python bench/defences.py --steps 40           # longer training for the utility column

Tables (name: scenario, defence, strengths, attacks):
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPERT_KINDS = ["expert_fwd", "eval_expert_fwd"]


def grid(dtype, key, values, **extra):
    return [(f"{key}={v}", {"defences": [{"type": dtype, key: v, **extra}]}) for v in values]


TABLES = {
    # name: (scenario, [(setting, scenario overrides)], [(attack, options)])
    "fedsgd-topk": ("fedsgd-tiny", grid("topk", "fraction", [0.5, 0.1, 0.01], kinds=["grad"]),
                    [("dager", {}), ("bag-of-tokens", {})]),
    "fedsgd-santext": ("fedsgd-tiny", grid("santext", "epsilon", [400.0, 100.0, 25.0]), [("dager", {})]),
    "fedsgd-secagg": ("fedsgd-tiny", grid("secagg", "frac_bits", [24, 20, 16]),
                      [("dager", {"aggregate": True}), ("dager", {})]),
    # where B x n of the securely aggregated sum crosses the hidden size (2 x 16 tokens a party, hidden 64)
    "fedsgd-secagg-parties": ("fedsgd-tiny", [(f"parties={n}", {"parties": {"count": n},
                                                                "defences": [{"type": "secagg"}]})
                                              for n in (1, 2, 3, 4)],
                              [("dager", {"aggregate": True})]),
    "pcmoe-clip-noise": ("pcmoe-tiny", grid("clip_noise", "sigma", [0.1, 0.5, 1.0], kinds=EXPERT_KINDS),
                         [("embedding-nn", {})]),
    "privatelora-embed-noise": ("privatelora-tiny", grid("clip_noise", "sigma", [1.0, 4.0, 8.0], kinds=["embed"]),
                                [("embedding-nn", {}), ("lora-m-recovery", {})]),
}
__doc__ += "".join(f"  {k}: {v[0]}, {', '.join(label for label, _ in v[1])}; attacks {[a for a, _ in v[2]]}\n"
                   for k, v in TABLES.items())


def run_point(scenario, overrides, attacks, steps, runs):
    from attacks.runner import run_attacks
    from testbed.run.runner import run_scenario
    from testbed.scenario import load_scenario
    over = {"defences": [], **overrides, "baselines": []}
    if steps:
        over["training"] = {"steps": steps}
    sc = load_scenario(ROOT / "scenarios" / f"{scenario}.yaml", over)
    path, summary = run_scenario(sc, runs_root=runs, base_dir=ROOT, cache_dir=ROOT / ".cache" / "tokenizers",
                                 progress=False)
    loss = next(iter(summary["protocols"].values()))["mean_eval_loss"]
    out = {"loss": loss}
    for name, options in attacks:
        results = run_attacks(path, [{"name": name, "options": options}], write=True)
        ok = [r for r in results if r["status"] == "ok"]
        label = name + ("(sum)" if options.get("aggregate") else "")
        best = max(ok, key=lambda r: r["scores"].get("token_accuracy", r["scores"].get("token_set_recall")) or 0.0) \
            if ok else None
        s = best["scores"] if best else {}
        # sequence attacks: token accuracy; set-valued ones (PC-MoE, bag of tokens): set recall
        acc = s.get("token_accuracy", s.get("token_set_recall"))
        out[label] = (acc, s.get("canary_recovery"), best["observer"] if best else "-")
    return out


def fmt(x):
    return "-" if x is None else f"{x:.3f}"


def table(name, steps, runs):
    scenario, points, attacks = TABLES[name]
    rows = [] if name.endswith("-parties") else [("none", run_point(scenario, {}, attacks, steps, runs))]
    for label, overrides in points:
        rows.append((label, run_point(scenario, overrides, attacks, steps, runs)))
        print(f"  {name}: {label} done", file=sys.stderr, flush=True)
    labels = [k for k in rows[0][1] if k != "loss"]
    print(f"\n### {name} on {scenario}" + (f" ({steps} steps)" if steps else ""))
    print("| setting | held-out loss | " + " | ".join(f"{a} accuracy | {a} canary" for a in labels) + " |")
    print("|---|---|" + "---|---|" * len(labels))
    for setting, r in rows:
        cells = " | ".join(f"{fmt(r[a][0])} | {fmt(r[a][1])}" for a in labels)
        print(f"| {setting} | {fmt(r['loss'])} | {cells} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=list(TABLES), help="tables to run (default: all)")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: each scenario's own)")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as runs:
        for name in args.only or TABLES:
            table(name, args.steps, runs)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
