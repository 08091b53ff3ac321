"""Cost of the ``flops`` compute mode: one training step of a scenario's model with no
counter, with torch's ``FlopCounterMode`` and with the engine's lean ``FlopCount``.

    python bench/flop_counter.py [--scenario scenarios/pcmoe-flagship.yaml] [--steps 10] [--repeats 3]

All three alternate in this process on the same model and batch; the best time of each is
compared.  Prints the ratios to the uncounted step and checks both counters agree.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parties.models import build_model  # noqa: E402
from testbed.engine.flops import FlopCount  # noqa: E402
from testbed.scenario import load_scenario  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default=str(ROOT / "scenarios" / "pcmoe-flagship.yaml"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sc = load_scenario(args.scenario)
    vocab = sc.data.tokenizer.vocab_size
    model = build_model(sc.model.model_copy(update={"path": None}), vocab, 0)
    ids = torch.randint(vocab, (sc.training.batch_size, sc.training.seq_len),
                        generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    counters = {"none": None, "FlopCounterMode": lambda: FlopCounterMode(display=False), "FlopCount": FlopCount}
    best, totals = {k: float("inf") for k in counters}, {}
    for _ in range(args.repeats):
        for name, make in counters.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                if make is None:
                    step()
                else:
                    with make() as c:
                        step()
                    totals[name] = c.get_total_flops()
            best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
    for name, t in best.items():
        print(f"{name:<16} {t * 1000:8.1f} ms/step   x{t / best['none']:.2f}")
    print(f"FLOPs per step: {totals['FlopCount']:,} (FlopCounterMode: {totals['FlopCounterMode']:,})")
    return 0 if totals["FlopCount"] == totals["FlopCounterMode"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
