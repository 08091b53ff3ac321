"""The report's view of a run over several seeds: mean ± 95% CI and an error-bar plot.

A parent run directory written by ``--seeds`` (``manifest.json`` kind ``seeds``) is
expanded into its per-seed children, so every other section shows each seed's run;
this section adds the parent's summary: per protocol the final and best held-out loss
as mean ± 95% CI (Student's t) and the paired difference to centralized, printed as
"no difference" when it is not larger than its half-width.
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure as MplFigure  # noqa: E402

from testbed.stats import claim, fmt_ci  # noqa: E402

from .doc import Figure, Section, Table  # noqa: E402

PNG = "seeds.png"


def _read(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def expand(paths):
    """-> (run directories, [(parent path, parent summary)]): each seeds parent among
    ``paths`` is replaced by its children (in seed order)."""
    runs, groups = [], []
    for p in map(Path, paths):
        man = _read(p / "manifest.json") or {}
        if man.get("kind") != "seeds":
            runs.append(p)
            continue
        runs += [p / c for c in man.get("children", []) if (p / c).is_dir()]
        summary = _read(p / "summary.json")
        if summary:
            groups.append((p, summary))
    return runs, groups


def plot_seeds(groups, path):
    """Grouped bars of mean final and best held-out loss with 95% CI error bars."""
    labels, finals, bests = [], [], []
    for parent, s in groups:
        for name, p in s["protocols"].items():
            labels.append(name if len(groups) == 1 else f"{parent.name}\n{name}")
            finals.append(p["final"])
            bests.append(p["best"])
    fig = MplFigure(figsize=(10.0, 4.8))
    ax = fig.add_subplot()
    xs = range(len(labels))
    for off, series, name in ((-0.2, finals, "final"), (0.2, bests, "best checkpoint")):
        ax.bar([x + off for x in xs], [c["mean"] or 0 for c in series], width=0.4, label=name,
               yerr=[c["half"] or 0 for c in series], capsize=4)
    lo = min((c["mean"] - (c["half"] or 0) for c in finals + bests if c["mean"] is not None), default=0)
    ax.set_ylim(bottom=max(0.0, lo * 0.9))
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("held-out loss (mean ± 95% CI over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def seeds_section(ctx):
    groups = getattr(ctx, "seed_groups", None)
    if not groups:
        return None
    sec = Section("Seeds and confidence intervals")
    for parent, s in groups:
        ref = s.get("reference")
        cols = ["protocol", "final eval loss", "best eval loss"]
        cols += [f"final − {ref}", f"best − {ref}"] if ref else []
        rows = []
        for name, p in s["protocols"].items():
            row = [name, fmt_ci(p["final"]), fmt_ci(p["best"])]
            if ref:
                row += [claim(p["final_vs_reference"]), claim(p["best_vs_reference"])] \
                    if "final_vs_reference" in p else ["-", "-"]
            rows.append(row)
        sec.add(Table(cols, rows, caption=f"{parent.name}: {len(s['seeds'])} seeds "
                      f"({', '.join(map(str, s['seeds']))}); mean ± 95% CI (t-distribution); "
                      "differences are paired by seed"))
    sec.add(Figure(plot_seeds(groups, ctx.out_dir / PNG),
                   "held-out loss per protocol, mean over seeds with 95% CI error bars"))
    return sec
