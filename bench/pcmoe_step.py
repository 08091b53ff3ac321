"""PC-MoE step vs centralized step: wall time per training step in the embedded engine.

    python bench/pcmoe_step.py [--scenario scenarios/pcmoe-4party.yaml] [--steps 40] [--repeats 3]

Both protocols run the scenario's model and batch through the SimEngine in this process,
alternating, ``--repeats`` times; PC-MoE with its capture written (the scenario's
``capture.tensors`` policy) unless ``--no-capture``.  Evaluation is off, so a step is
one forward and backward (PC-MoE: with every expert message encoded, decoded, delivered
and captured).  Prints the best time per step of each and the ratio PC-MoE /
centralized; the goal is <= 1.30.
"""
import argparse
import copy
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parties.base import RoleContext  # noqa: E402
from parties.data.dataset import prepare_data  # noqa: E402
from parties.models import build_model  # noqa: E402
from parties.registry import get_protocol  # noqa: E402
from testbed.engine.memory import MemoryTracker  # noqa: E402
from testbed.engine.sim import SimEngine  # noqa: E402
from testbed.run import capture_policy  # noqa: E402
from testbed.run.capture import CaptureWriter  # noqa: E402
from testbed.run.runner import endpoint_configs  # noqa: E402
from testbed.scenario import load_scenario  # noqa: E402


def run(name, sc, data, init, capture_dir=None):
    """Wall seconds of ``sc.training.steps`` steps of protocol ``name`` in the SimEngine."""
    ctx = RoleContext(sc, data.vocab_size, data.parties, torch.device("cpu"),
                      build_model=lambda: copy.deepcopy(init), protocol_name=name)
    proto = get_protocol(name)(ctx)
    ctx.trackers = {r: MemoryTracker(r) for r in proto.role_names()}
    capture = None
    if capture_dir is not None:
        capture = CaptureWriter(Path(capture_dir) / name, name,
                                tensors=capture_policy.resolve(sc.capture, name, sc.attacks))
    losses = []
    eng = SimEngine(name, endpoint_configs(sc, proto.role_names()), random.Random(sc.seed),
                    on_log=lambda r: losses.append(r["loss"]) if r.get("event") == "train" else None,
                    capture=capture, compute_mode="none")
    roles = proto.roles()
    t0 = time.perf_counter()
    eng.run(roles)
    if capture is not None:
        capture.close()
    return time.perf_counter() - t0, losses, eng.stats()


def main():
    torch.set_num_threads(int(os.environ.get("TESTBED_THREADS", "1")))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", default=str(ROOT / "scenarios/pcmoe-4party.yaml"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-capture", action="store_true", help="run PC-MoE without a capture")
    args = ap.parse_args()
    from testbed.cli.run import _override
    sc = load_scenario(args.scenario, _override([f"training.steps={args.steps}",
                                                 f"training.eval_every={10 ** 9}"]))
    data = prepare_data(sc, ROOT, Path(tempfile.mkdtemp()))
    init = build_model(sc.model, data.vocab_size, sc.seed)
    best = {"pcmoe": float("inf"), "centralized": float("inf")}
    stats = {}
    for rep in range(args.repeats):
        for name in ("centralized", "pcmoe"):
            with tempfile.TemporaryDirectory() as tmp:
                cap = None if args.no_capture or name == "centralized" else tmp
                dt, losses, stats[name] = run(name, sc, data, init, cap)
            best[name] = min(best[name], dt)
            print(f"repeat {rep + 1}/{args.repeats}  {name:<12} {dt:7.2f} s  "
                  f"{1000 * dt / args.steps:7.1f} ms/step  final loss {losses[-1]:.4f}", flush=True)
    ratio = best["pcmoe"] / best["centralized"]
    m = sc.model
    print(f"\n{Path(args.scenario).name}: {sc.parties.count} parties, {m.family} h{m.hidden_size} "
          f"x{m.num_layers} layers, {m.num_experts} experts top-{m.top_k}, batch {sc.training.batch_size}"
          f"x{sc.training.seq_len}, {args.steps} steps, threads {torch.get_num_threads()}, "
          f"capture {'off' if args.no_capture else 'on'}; {stats['pcmoe']['messages']} PC-MoE messages, "
          f"{stats['pcmoe']['bytes'] / 2 ** 20:.1f} MiB; load average {os.getloadavg()[0]:.2f}")
    print(f"centralized {1000 * best['centralized'] / args.steps:.1f} ms/step   "
          f"pcmoe {1000 * best['pcmoe'] / args.steps:.1f} ms/step   "
          f"ratio pcmoe/centralized = {ratio:.3f}  (goal <= 1.30: {'met' if ratio <= 1.30 else 'missed'})")


if __name__ == "__main__":
    main()
