"""Engine overhead: the ``centralized`` protocol through the embedded engine vs a plain
hand-written ``transformers`` training loop on the same model, data and steps.

    python bench/engine_overhead.py [--scenario scenarios/quickstart.yaml] [--steps 100] [--repeats 3]

Both run in this process, alternating, and the best time of each is compared.
Prints the ratio engine / plain; the goal is <= 1.10.
"""
import argparse
import copy
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parties.base import RoleContext, eval_loss  # noqa: E402
from parties.single_site.centralized import Centralized  # noqa: E402
from parties.data.dataset import prepare_data  # noqa: E402
from parties.models import build_model  # noqa: E402
from testbed.engine.devices import resolve_device  # noqa: E402
from testbed.engine.sim import SimEngine  # noqa: E402
from testbed.engine.links import resolve_link  # noqa: E402
from testbed.engine.memory import MemoryTracker  # noqa: E402
from testbed.scenario import load_scenario  # noqa: E402


def plain_loop(sc, data, init):
    """What a researcher would write by hand: sample, forward, backward, step, eval."""
    tr = sc.training
    model = copy.deepcopy(init)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
    gen = RoleContext(sc, data.vocab_size, data.parties, torch.device("cpu"), None).generator("site")
    pool = torch.cat([p.train for p in data.parties])
    losses = []
    for step in range(tr.steps):
        ids = pool[torch.randint(len(pool), (tr.batch_size,), generator=gen)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % tr.eval_every == 0 or step + 1 == tr.steps:
            for p in data.parties:
                eval_loss(model, p.eval_batches(tr.batch_size, tr.eval_batches))
    return losses


def engine_run(sc, data, init):
    ctx = RoleContext(sc, data.vocab_size, data.parties, torch.device("cpu"),
                      build_model=lambda: copy.deepcopy(init), protocol_name="centralized")
    ctx.trackers = {"site": MemoryTracker("site")}
    losses = []
    endpoints = {"site": (resolve_device("host"), resolve_link("lan"))}
    eng = SimEngine("centralized", endpoints, random.Random(0),
                    on_log=lambda r: losses.append(r["loss"]) if r["event"] == "train" else None)
    eng.run(Centralized(ctx).roles())
    return losses


def main():
    torch.set_num_threads(int(__import__("os").environ.get("TESTBED_THREADS", "1")))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", default=str(ROOT / "scenarios/quickstart.yaml"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from testbed.cli.run import _override
    sc = load_scenario(args.scenario, _override([f"training.steps={args.steps}"]))
    data = prepare_data(sc, ROOT, Path(tempfile.mkdtemp()))
    init = build_model(sc.model, data.vocab_size, sc.seed)
    best = {"plain": float("inf"), "engine": float("inf")}
    for rep in range(args.repeats):
        for name, fn in (("plain", plain_loop), ("engine", engine_run)):
            t0 = time.perf_counter()
            losses = fn(sc, data, init)
            dt = time.perf_counter() - t0
            best[name] = min(best[name], dt)
            print(f"repeat {rep + 1}/{args.repeats}  {name:<7} {dt:7.2f} s  final loss {losses[-1]:.4f}")
    assert plain_loop(sc, data, init) == engine_run(sc, data, init), "the two loops must train identically"
    ratio = best["engine"] / best["plain"]
    print(f"\nsteps {args.steps}, batch {sc.training.batch_size}, seq {sc.training.seq_len}, "
          f"threads {torch.get_num_threads()}")
    print(f"plain loop  {best['plain']:.2f} s   engine {best['engine']:.2f} s   "
          f"ratio engine/plain = {ratio:.3f}  (goal <= 1.10: {'met' if ratio <= 1.10 else 'missed'})")


if __name__ == "__main__":
    main()
