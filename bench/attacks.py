"""Attack speed: seconds per reconstructed sequence, each attack on one fixed capture.

    python bench/attacks.py [RUN_DIR] [--attack NAME ...] [--repeats 1]

Without RUN_DIR, scenarios/fedsgd-tiny.yaml (2 rounds, no baselines) is run into a
temporary directory first -- and, for the attacks on other protocols' traffic, the fixed
capture of :data:`CAPTURES` of the protocol they target (split-tiny, privatelora-tiny,
pcmoe-tiny, a few steps each; for FedAvg, fedsgd-tiny with one local SGD step a round).
Each attack runs ``--repeats`` times as its default observer with default options; the
best wall time is divided by the number of sequences it reconstructed (for set-valued
attacks such as bag-of-tokens: by the number of batches).
Timing depends on how busy the machine is: compare numbers from one session only.  The
``cpu s`` column is the process's CPU time for the same best repeat: the attacks run on one
thread (option ``threads``, default 1), so on a busy machine it is what the wall time would
be on a quiet one.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attacks import observers as obs  # noqa: E402
from attacks.registry import attack_names, get_attack  # noqa: E402
from attacks.runner import captured_roles  # noqa: E402
from attacks.view import AdversaryView  # noqa: E402


# protocol -> (scenario, steps) of the fixed capture its attacks are timed on
CAPTURES = {"fedsgd": ("fedsgd-tiny.yaml", 2), "fedavg": ("fedsgd-tiny.yaml", 2), "split": ("split-tiny.yaml", 2),
            "privatelora": ("privatelora-tiny.yaml", 3), "pcmoe": ("pcmoe-tiny.yaml", 2)}
# the FedAvg capture: fedsgd-tiny as FedAvg with one local SGD step (deltas are scaled gradients)
OVERRIDES = {"fedavg": {"protocol": {"name": "fedavg", "options": {"local_steps": 1}},
                        "training": {"optimizer": "sgd", "lr": 0.1}}}


def fixed_capture(tmp, protocol="fedsgd"):
    from testbed.run.runner import run_scenario
    from testbed.scenario import load_scenario
    scenario, steps = CAPTURES[protocol]
    from testbed.scenario import deep_merge
    sc = load_scenario(ROOT / "scenarios" / scenario, deep_merge(OVERRIDES.get(protocol, {}), {
        "baselines": [], "training": {"steps": steps}, "compute": {"mode": "none"}}))
    path, _ = run_scenario(sc, runs_root=Path(tmp) / protocol / "runs", base_dir=ROOT,
                           cache_dir=Path(tmp) / "cache", progress=False)
    return path


def capture_protocols(names):
    """The protocols of :data:`CAPTURES` the attacks ``names`` target, in table order."""
    wanted = {p for n in names for p in get_attack(n).targets}
    return [p for p in CAPTURES if p in wanted]


def bench(run_dir, names, repeats):
    """-> rows (attack, observer, reconstructions, best seconds, its CPU seconds, seconds per
    unit, unit)."""
    import yaml
    protocol = yaml.safe_load((Path(run_dir) / "scenario.yaml").read_text())["protocol"]["name"]
    roles = captured_roles(run_dir, protocol)
    AdversaryView(run_dir, "wire").init_model()  # pay the one-off transformers import outside the timings
    rows = []
    for name in names:
        attack = get_attack(name)
        if not attack.applies_to(protocol):
            continue
        observers = obs.default_observers(protocol, attack.kinds(protocol), roles)
        if not observers:
            continue
        view = AdversaryView(run_dir, observers[0], knowledge=attack.threat_model.knowledge)
        options = attack.resolve_options({})
        best, cpu, recs = None, None, []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            recs = attack.run(view, **options)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if best is None or dt < best:
                best, cpu = dt, dc
        seqs = [r for r in recs if r.kind == "sequence" and r.token_ids]
        units, unit = (len(seqs), "sequence") if seqs else (len({r.batch for r in recs}), "batch")
        rows.append((name, observers[0], len(recs), best, cpu, best / max(units, 1), unit))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", nargs="?", help="a run directory (default: a fresh fedsgd-tiny run)")
    p.add_argument("--attack", action="append", help="attack to time (repeatable; default: all)")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args(argv)
    names = args.attack or attack_names()
    with tempfile.TemporaryDirectory() as tmp:
        if args.run_dir:
            rows = [("-", row) for row in bench(Path(args.run_dir), names, args.repeats)]
        else:
            rows = [(protocol, row) for protocol in capture_protocols(names)
                    for row in bench(fixed_capture(tmp, protocol), names, args.repeats)]
    print(f"{'attack':<20}{'capture':<13}{'observer':<13}{'recs':>6}{'seconds':>10}{'cpu s':>9}{'s/unit':>10}  unit")
    for protocol, (name, who, n, sec, cpu, per, unit) in rows:
        print(f"{name:<20}{protocol:<13}{who:<13}{n:>6}{sec:>10.2f}{cpu:>9.2f}{per:>10.3f}  {unit}")
    print(f"total: {sum(r[3] for _, r in rows):.1f} s wall, {sum(r[4] for _, r in rows):.1f} s CPU "
          f"(load average {open('/proc/loadavg').read().split()[0]})" if Path("/proc/loadavg").exists() else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
