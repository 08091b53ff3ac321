"""Cross-device scale: wall time and peak RSS of FedAvg / FedSGD as the party count grows.

    python bench/scale.py [--parties 8 128 1000] [--protocol fedavg] [--rounds 10] [--sample 0.1]

Each party count runs in its own process (so peak RSS is that run's own), one after the
other: a tiny LLaMA (h128, 2 layers, vocab 1024, batch 8x64), ``--rounds`` rounds of one
local step, ``clients_per_round`` = ``--sample`` x parties (at least 1), no baselines,
capture off, modelled compute.  Prints wall time, peak RSS, and the cost per party
(the slope between the smallest and each larger count).  A count that runs past
``--timeout`` seconds is reported as such.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def scenario(protocol, n, rounds, sample):
    k = max(1, round(sample * n))
    opts = {"clients_per_round": k}
    if protocol == "fedavg":
        opts["local_steps"] = 1
    return {
        "name": f"scale-{protocol}-{n}", "seed": 0,
        "model": {"family": "llama", "hidden_size": 128, "num_layers": 2, "num_heads": 4,
                  "num_kv_heads": 2, "intermediate_size": 256},
        "data": {"source": "generate", "kinds": ["patient_note", "support_ticket", "email"],
                 "records": max(200, 4 * n), "eval_fraction": 0.15, "split": {"method": "iid"},
                 "canaries": {"count": 0}, "tokenizer": {"vocab_size": 1024}},
        "protocol": {"name": protocol, "options": opts},
        "parties": {"count": n, "device": "host", "link": "lan"},
        "training": {"steps": rounds, "batch_size": 8, "seq_len": 64, "lr": 0.003,
                     "eval_every": rounds, "eval_batches": 1},
        "compute": {"mode": "none"},
        "capture": {"enabled": False},
    }


def one(protocol, n, rounds, sample):
    """Run one configuration in this process; print a JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch
    torch.set_num_threads(int(os.environ.get("TESTBED_THREADS", "1")))
    from testbed.run.runner import run_scenario
    from testbed.scenario import parse_scenario
    sc = parse_scenario(scenario(protocol, n, rounds, sample), "<scale>")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_scenario(sc, runs_root=Path(tmp) / "runs", base_dir=ROOT, cache_dir=Path(tmp) / "cache",
                     progress=False)
        wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"parties": n, "wall_s": wall, "peak_rss": rss}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parties", type=int, nargs="+", default=[8, 128, 1000])
    ap.add_argument("--protocol", default="fedavg", choices=["fedavg", "fedsgd"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--sample", type=float, default=0.1, help="fraction of parties per round")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per party count")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args.protocol, args.one, args.rounds, args.sample)
    rows = []
    for n in args.parties:
        cmd = [sys.executable, __file__, "--one", str(n), "--protocol", args.protocol,
               "--rounds", str(args.rounds), "--sample", str(args.sample)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            print(f"{n:>6} parties: over {args.timeout:.0f} s", flush=True)
            continue
        except subprocess.CalledProcessError as exc:
            print(f"{n:>6} parties: failed: {exc.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        rows.append(rec)
        print(f"{n:>6} parties  {rec['wall_s']:8.1f} s  peak RSS {rec['peak_rss'] / 2 ** 30:6.2f} GiB",
              flush=True)
    if len(rows) > 1:
        base = rows[0]
        for r in rows[1:]:
            dn = r["parties"] - base["parties"]
            print(f"per extra party ({base['parties']} -> {r['parties']}): "
                  f"{1000 * (r['wall_s'] - base['wall_s']) / dn:.1f} ms, "
                  f"{(r['peak_rss'] - base['peak_rss']) / dn / 2 ** 20:.2f} MiB")
    print(f"{args.protocol}, {args.rounds} rounds, {args.sample:.0%} of parties per round; "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
