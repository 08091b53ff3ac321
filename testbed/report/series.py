"""Numbers derived from loaded runs: loss curves, final losses, peaks, labels, colours.

:class:`Context` is what every section builder receives: the runs, the output
directory, and one label and colour per (run, protocol) series, so the same protocol
has the same colour in every plot of a report.
"""
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from . import plots

# A train band is drawn through at most this many x values (the curve's detail on screen).
MAX_BAND_POINTS = 600


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


def last_train_losses(run, protocol):
    """party -> (step, loss) of its last train record."""
    return {party: pts[-1] for party, pts in _party_points(run, protocol, "train", "loss", "step").items() if pts}


def _party_points(run, protocol, event, key, axis):
    """party -> [(x, value)] sorted by x, x the record's ``axis`` (step or sim_time);
    a party's values at the same x are averaged."""
    by_party = defaultdict(lambda: defaultdict(list))
    for r in run.events(event, protocol):
        if r.get(key) is not None and r.get(axis) is not None:
            by_party[r.get("party", "?")][r[axis]].append(r[key])
    return {p: sorted((x, _mean(vs)) for x, vs in pts.items()) for p, pts in sorted(by_party.items())}


def train_band(run, protocol, axis="step", max_points=MAX_BAND_POINTS):
    """Train loss over parties as one curve: [(x, mean, min, max)].

    Each party's curve is interpolated linearly (never extrapolated) onto the union of
    the parties' x values -- at most ``max_points``, evenly spaced past that -- and the
    parties whose curve spans an x give its mean and min-max.  Parties need not share x
    values: each runs on its own simulated clock, and some protocols (PC-MoE) give each
    step to one party in turn."""
    import numpy as np
    curves = [c for c in _party_points(run, protocol, "train", "loss", axis).values() if c]
    if not curves:
        return []
    grid = np.unique(np.concatenate([[x for x, _ in c] for c in curves]).astype(float))
    if len(grid) > max_points:
        grid = np.linspace(grid[0], grid[-1], max_points)
    ys = np.full((len(curves), len(grid)), np.nan)
    for i, c in enumerate(curves):
        xp, fp = np.array(c, dtype=float).T
        inside = (grid >= xp[0]) & (grid <= xp[-1])
        ys[i, inside] = np.interp(grid[inside], xp, fp)
    keep = ~np.all(np.isnan(ys), axis=0)
    ys, grid = ys[:, keep], grid[keep]
    return list(zip(grid.tolist(), np.nanmean(ys, 0).tolist(), np.nanmin(ys, 0).tolist(),
                    np.nanmax(ys, 0).tolist()))


def eval_band(run, protocol, axis="step"):
    """Held-out loss over parties per evaluation: [(x, mean, min, max)], one point per
    eval step (every party evaluates at the same step); against time, x is the mean of
    the parties' simulated times at that step."""
    by_step = defaultdict(list)
    for r in run.events("eval", protocol):
        if "step" in r and r.get("eval_loss") is not None and r.get(axis) is not None:
            by_step[r["step"]].append((r[axis], r["eval_loss"]))
    out = []
    for _, pts in sorted(by_step.items()):
        losses = [v for _, v in pts]
        out.append((_mean([x for x, _ in pts]), _mean(losses), min(losses), max(losses)))
    return sorted(out)


def learning_series(ctx, axis):
    """[(label, colour, train band, eval band)]: one entry per (run, protocol), the
    parties folded into a mean curve with a min-max band (``axis``: step or sim_time)."""
    return [(ctx.label(run, p), ctx.color(run, p), train_band(run, p, axis), eval_band(run, p, axis))
            for run, p in ctx.pairs()]


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
