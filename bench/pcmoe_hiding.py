"""PC-MoE's hiding options against the expert-host attacks: each option on vs off.

Runs ``scenarios/pcmoe-tiny.yaml`` once with the options off and once per option (same seed,
same data), attacks every capture as each expert host with embedding-nn, routing-trace and a
small learned inverter, and prints one Markdown table: held-out loss, bytes of expert traffic,
what the host can read from the layout (rows in token order, repeated rows, distinct
per-expert counts, messages that say they are evaluation) and, per attack, per-position token accuracy, routed accuracy (over the real
rows received) and token-set recall, each the mean over the two hosts.

    python bench/pcmoe_hiding.py              # every setting (~3 min on 2 cores)
    python bench/pcmoe_hiding.py --only off shuffle_rows
    python bench/pcmoe_hiding.py --scenario scenarios/pcmoe-4party.yaml --only off all \
        --set training.steps=100 --attack-steps 0 99

A second table gives each attack's per-position token accuracy and routed accuracy per MoE
layer (``scores.by_layer``, mean over the hosts).
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {"off": {}, "shuffle_rows": {"shuffle_rows": True}, "dedup_rows": {"dedup_rows": True},
            "pad_counts=4": {"pad_counts": 4}, "eval_traffic=disguised": {"eval_traffic": "disguised"},
            "all": {"shuffle_rows": True, "dedup_rows": True, "pad_counts": 4, "eval_traffic": "disguised"}}
ATTACKS = [("embedding-nn", {}), ("routing-trace", {}),
           ("learned-inverter", {"hidden": 128, "epochs": 4, "aux_records": 120})]
METRICS = ("token_accuracy", "routed_accuracy", "token_set_recall")
EXPERT = ("expert_fwd", "expert_out", "expert_bwd", "expert_grad_in", "eval_expert_fwd", "eval_expert_out")


def layout_stats(path):
    """What the hosts could read from the layout of the training ``expert_fwd`` messages:
    the fraction of adjacent rows of an expert's block in increasing token position, the
    rows that repeat a token already in the message, and the distinct per-expert counts."""
    routes = {}   # key -> route records in the order sent; a key's messages take them in order
    for r in map(json.loads, open(path / "truth" / "routes.jsonl")):
        routes.setdefault((r["party"], r["step"], r["layer"], r["host"]), []).append(r)
    rising = pairs = repeated = 0
    counts, taken = set(), {}
    for m in map(json.loads, open(path / "capture" / "index.jsonl")):
        if m["kind"] != "expert_fwd":
            continue
        meta = m["meta"]
        key = (meta["origin"], m["step"], meta["layer"], meta["host"])
        i = taken[key] = taken.get(key, -1) + 1
        route = routes[key][i] if i < len(routes.get(key, [])) else None
        if route is None or route.get("eval"):   # evaluation (disguised as training)
            continue
        pos = route["positions"]
        counts.update(meta["counts"])
        if "row_index" in m["tensors"]:   # one row per token: the whole message is one block
            blocks = [pos]
        else:
            blocks, at = [], 0
            for c in meta["counts"]:
                blocks.append(pos[at:at + c])
                at += c
        for block in blocks:
            flat = [b * 10_000 + p for b, p in block if b >= 0]
            rising += sum(a < b for a, b in zip(flat, flat[1:]))
            pairs += max(len(flat) - 1, 0)
        real = [tuple(p) for p in pos if p[0] >= 0]
        repeated += len(real) - len(set(real))
    return {"in_order": rising / max(pairs, 1), "repeated": repeated, "distinct_counts": len(counts)}


def run_setting(options, runs, scenario, overrides=(), attack_steps=None):
    from attacks.runner import run_attacks
    from testbed.run.runner import run_scenario
    from testbed.cli.run import _override
    from testbed.merge import deep_merge
    from testbed.scenario import load_scenario
    sc = load_scenario(scenario, deep_merge({"protocol": {"options": options}, "capture": {"tensors": True},
                                             "baselines": [], "attacks": []}, _override(overrides)))
    path, summary = run_scenario(sc, runs_root=runs, base_dir=ROOT, cache_dir=ROOT / ".cache" / "tokenizers",
                                 progress=False)
    index = [m for m in map(json.loads, open(path / "capture" / "index.jsonl")) if m["kind"] in EXPERT]
    out = {"loss": summary["protocols"]["pcmoe"]["mean_eval_loss"], **layout_stats(path),
           "bytes": sum(m["bytes"] for m in index),
           "eval_labelled": sum(m["kind"].startswith("eval_") or m["meta"].get("phase") == "eval" for m in index)}
    for name, opts in ATTACKS:
        opts = {**opts, **({"steps": list(attack_steps)} if attack_steps else {})}
        ok = [r for r in run_attacks(path, [{"name": name, "options": opts}], write=False) if r["status"] == "ok"]
        out[name] = {m: sum(r["scores"][m] for r in ok) / len(ok) for m in METRICS}
        layers = {}
        for r in ok:
            for layer, sc_ in r["scores"].get("by_layer", {}).items():
                layers.setdefault(layer, []).append(sc_)
        out[name]["by_layer"] = {k: {m: sum(v[m] for v in vs) / len(vs) for m in ("token_accuracy", "routed_accuracy")}
                                 for k, vs in sorted(layers.items())}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(SETTINGS), help="settings to run (default: all)")
    p.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "pcmoe-tiny.yaml",
                   help="a PC-MoE scenario (default scenarios/pcmoe-tiny.yaml); its baselines and attacks are dropped")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario key, as in `python -m testbed run --set` (repeatable)")
    p.add_argument("--attack-steps", type=int, nargs="+", metavar="STEP",
                   help="the training steps the attacks read (default: each attack's default)")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as runs:
        for name in args.only or SETTINGS:
            rows.append((name, run_setting(SETTINGS[name], runs, args.scenario, args.sets, args.attack_steps)))
            print(f"  {name} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    head = ["setting", "held-out loss", "expert bytes", "rows in order", "repeated rows", "distinct counts",
            "eval-labelled msgs"]
    head += [f"{a} {m.replace('token_', '').replace('_', ' ')}" for a, _ in ATTACKS for m in METRICS]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, r in rows:
        cells = [name, f"{r['loss']:.4f}", str(r["bytes"]), f"{r['in_order']:.2f}", str(r["repeated"]),
                 str(r["distinct_counts"]), str(r["eval_labelled"])] + [f"{r[a][m]:.3f}" for a, _ in ATTACKS for m in METRICS]
        print("| " + " | ".join(cells) + " |", flush=True)
    layers = sorted({k for _, r in rows for a, _ in ATTACKS for k in r[a]["by_layer"]})
    if layers:
        print("\nPer MoE layer: per-position token accuracy / routed accuracy (mean over hosts)\n")
        head = ["setting", "attack"] + [f"layer {k}" for k in layers]
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for name, r in rows:
            for a, _ in ATTACKS:
                bl = r[a]["by_layer"]
                cells = [f"{bl[k]['token_accuracy']:.3f} / {bl[k]['routed_accuracy']:.3f}" if k in bl else "-"
                         for k in layers]
                print("| " + " | ".join([name, a] + cells) + " |", flush=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
