"""The frontier plot: attack success against held-out loss, one point per defence setting.

Two panels share the loss axis: tokens recovered (left) and canaries recovered (right).
Each attack is one line through its settings in order of strength; each setting is
labelled once per panel, beside its highest point, with its swept value (and ε).
"""
import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after selecting the backend)

from .plots import WIDTH  # noqa: E402

MARKERS = "osD^vP*X"
PANELS = ((1, "tokens recovered"), (2, "canaries recovered"))


def _text(label, eps):
    return label if eps is None else f"{label}\nε={eps:.3g}"


def frontier_plot(series, baselines, path, title):
    """``series``: [(name, [(loss, token, canary, label, epsilon)])] in order of strength
    (None where not measured); ``baselines``: {protocol: held-out loss} drawn as dashed
    vertical lines.  Writes ``path`` and returns it."""
    fig = Figure(figsize=(WIDTH + 2, 4.8))
    axes = fig.subplots(1, 2, sharex=True)
    cmap = matplotlib.colormaps["tab10"]
    losses = [p[0] for _, pts in series for p in pts if p[0] is not None]
    for ax, (col, ylabel) in zip(axes, PANELS):
        best = {}          # label -> (y, x, epsilon): where the setting's label goes
        for i, (name, pts) in enumerate(series):
            xy = [(p[0], p[col], p[3], p[4]) for p in pts if p[0] is not None and p[col] is not None]
            if not xy:
                continue
            ax.plot([x for x, *_ in xy], [y for _, y, *_ in xy], marker=MARKERS[i % len(MARKERS)], ms=6,
                    color=cmap(i % 10), label=name, alpha=0.9)
            for x, y, label, eps in xy:
                if label not in best or y > best[label][0]:
                    best[label] = (y, x, eps)
        for k, (label, (y, x, eps)) in enumerate(best.items()):
            ax.annotate(_text(label, eps), (x, y), textcoords="offset points", fontsize=7,
                        xytext=(5, 6 if k % 2 == 0 else -14), color="#333333")
        for j, (proto, loss) in enumerate(sorted(baselines.items())):
            ax.axvline(loss, color="grey", ls="--", lw=0.9)
            ax.annotate(proto, (loss, 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                        color="grey", ha="right", va="top", xytext=(-2, -2), textcoords="offset points")
        ax.set_ylim(-0.04, 1.08)
        ax.set_xlabel("held-out loss of the defended protocol (lower is better)")
        ax.set_ylabel(f"{ylabel} (lower is more private)")
        ax.set_title(ylabel, fontsize=10)
        ax.grid(alpha=0.3)
    if losses:
        lo, hi = min(losses + list(baselines.values())), max(losses + list(baselines.values()))
        pad = max(0.05 * (hi - lo), 0.01)
        axes[0].set_xlim(lo - pad, hi + 4 * pad)    # room for the labels on the right
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(4, len(handles)), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    fig.savefig(path, dpi=100)
    return path
