"""Numbers derived from loaded runs: loss curves, final losses, peaks, labels, colours.

:class:`Context` is what every section builder receives: the runs, the output
directory, and one label and colour per (run, protocol) series, so the same protocol
has the same colour in every plot of a report.
"""
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from . import plots


def is_party(role):
    return str(role).startswith("party-")


@dataclass
class Context:
    runs: list
    out_dir: Path
    colors: dict = field(default_factory=dict)

    def __post_init__(self):
        self.colors = plots.palette(self.keys())

    def keys(self):
        """Every (run label, protocol) pair, in run order."""
        return [(r.label, p) for r in self.runs for p in r.protocols]

    def pairs(self):
        """(run, protocol) for every series."""
        return [(r, p) for r in self.runs for p in r.protocols]

    def label(self, run, protocol):
        """'protocol' for a single run, 'run:protocol' when comparing runs."""
        return protocol if len(self.runs) == 1 else f"{run.label}:{protocol}"

    def color(self, run, protocol):
        return self.colors.get((run.label, protocol), "black")

    def png(self, name):
        return self.out_dir / name


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def train_curve(run, protocol):
    """[(step, mean train loss over parties, latest sim time of that step)]."""
    by_step = defaultdict(list)
    for r in run.events("train", protocol):
        if "step" in r and r.get("loss") is not None:
            by_step[r["step"]].append(r)
    return [(s, _mean([r["loss"] for r in rs]), max((r.get("sim_time") or 0.0) for r in rs))
            for s, rs in sorted(by_step.items())]


def eval_curve(run, protocol):
    """[(step, mean eval loss over parties, latest sim time of that step)]."""
    by_step = defaultdict(list)
    for r in run.events("eval", protocol):
        if "step" in r and r.get("eval_loss") is not None:
            by_step[r["step"]].append(r)
    return [(s, _mean([r["eval_loss"] for r in rs]), max((r.get("sim_time") or 0.0) for r in rs))
            for s, rs in sorted(by_step.items())]


def party_curves(run, protocol, event, key, limit=8):
    """[[(sim time, value)] per party], in time order: parties run on their own clocks,
    so against simulated time each party is its own curve.  Past ``limit`` parties, one
    curve of the per-step mean at the step's latest time instead."""
    by_party = defaultdict(list)
    for r in run.events(event, protocol):
        if r.get(key) is not None and r.get("sim_time") is not None:
            by_party[r.get("party", "?")].append((r["sim_time"], r[key]))
    if len(by_party) > limit:
        curve = train_curve(run, protocol) if event == "train" else eval_curve(run, protocol)
        return [sorted((t, v) for _, v, t in curve)]
    return [sorted(points) for _, points in sorted(by_party.items())]


def final_eval(run, protocol):
    """party -> its last eval loss."""
    out = {}
    for r in run.events("eval", protocol):
        if r.get("eval_loss") is not None:
            out[r.get("party", "?")] = r["eval_loss"]
    return out


def memory(run, protocol):
    """role -> its memory record (the last one written for that role)."""
    return {r.get("party", "?"): r for r in run.events("memory", protocol)}


def max_party_peak(run, protocol):
    """Largest peak among party roles (all roles when the protocol has no party-* role)."""
    mem = memory(run, protocol)
    parties = [m.get("peak") or 0 for role, m in mem.items() if is_party(role)]
    peaks = parties or [m.get("peak") or 0 for m in mem.values()]
    return max(peaks) if peaks else None


def engine(run, protocol):
    """The protocol's engine record ({} when it never finished)."""
    recs = run.events("engine", protocol)
    return recs[-1] if recs else {}


def central_reference(run):
    """(mean eval loss, max peak) of the run's centralized protocol, or (None, None)."""
    if "centralized" not in run.protocols:
        return None, None
    return _mean(list(final_eval(run, "centralized").values())), max_party_peak(run, "centralized")


def overview_row(run, protocol):
    """The numbers of one results-table row (None where the run has no such data)."""
    ev = final_eval(run, protocol)
    mean_ev = _mean(list(ev.values()))
    peak = max_party_peak(run, protocol)
    eng = engine(run, protocol)
    c_loss, c_peak = central_reference(run)
    other = protocol != "centralized"
    return {
        "mean_eval_loss": mean_ev,
        "vs_central": mean_ev / c_loss - 1 if other and mean_ev is not None and c_loss else None,
        "max_party_peak": peak,
        "mem_vs_central": peak / c_peak - 1 if other and peak is not None and c_peak else None,
        "bytes": eng.get("bytes"), "messages": eng.get("messages"), "sim_time": eng.get("sim_time"),
    }
