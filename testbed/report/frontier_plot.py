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
PANELS = ((1, "tokens recovered", "no token recovery measured"),
          (2, "canaries recovered", "no canary recovery measured\n(no canary in the attacked rows)"))


def _text(label, eps):
    return label if eps is None else f"{label}\nε={eps:.3g}"


def _clusters(best, xspan):
    """Settings whose label spots lie within a few percent of the axes of each other share one
    label (``σ=0, 0.01, 0.03``) at the highest of their points, so no label covers another.
    ``best``: {label: (y, x, epsilon)} in order of strength -> [(text, x, y)]."""
    groups = []
    for label, (y, x, eps) in best.items():
        for g in groups:
            if abs(g["x"] - x) <= 0.03 * xspan and abs(g["y"] - y) <= 0.05:
                g["items"].append((label, eps, x, y))
                break
        else:
            groups.append({"x": x, "y": y, "items": [(label, eps, x, y)]})
    out = []
    for g in groups:
        items = g["items"]
        if len(items) == 1:
            text = _text(items[0][0], items[0][1])
        elif any(eps is not None for _, eps, _, _ in items):     # one line per setting
            text = "\n".join(label if eps is None else f"{label}, ε={eps:.3g}" for label, eps, _, _ in items)
        else:
            labels = [label for label, *_ in items]
            head = labels[0].split("=", 1)[0] + "="
            if all(t.startswith(head) and ", " not in t for t in labels):
                labels = [labels[0]] + [t[len(head):] for t in labels[1:]]
            text = ", ".join(labels)
        _, _, x, y = max(items, key=lambda it: it[3])
        out.append((text, x, y))
    return out


def frontier_plot(series, baselines, path, title):
    """``series``: [(name, [(loss, token, canary, label, epsilon)])] in order of strength
    (None where not measured); ``baselines``: {protocol: held-out loss} drawn as dashed
    vertical lines.  Writes ``path`` and returns it."""
    fig = Figure(figsize=(WIDTH + 2, 4.8))
    axes = fig.subplots(1, 2, sharex=True)
    cmap = matplotlib.colormaps["tab10"]
    losses = [p[0] for _, pts in series for p in pts if p[0] is not None]
    xlim = None
    if losses:
        lo, hi = min(losses + list(baselines.values())), max(losses + list(baselines.values()))
        pad = max(0.08 * (hi - lo), 1e-3 * max(abs(hi), 1.0))
        xlim = (lo - pad, hi + 3 * pad)    # room for the labels on the right
    for ax, (col, ylabel, empty) in zip(axes, PANELS):
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
        if not best:
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="grey")
        for k, (text, x, y) in enumerate(_clusters(best, xlim[1] - xlim[0] if xlim else 1.0)):
            up = k % 2 == 0 or y < 0.1       # alternate above and below, never below the axis
            ax.annotate(text, (x, y), textcoords="offset points", fontsize=7, xytext=(5, 6 if up else -6),
                        va="bottom" if up else "top", color="#333333")
        for proto, loss in sorted(baselines.items()):
            ax.axvline(loss, color="grey", ls="--", lw=0.9)
            ax.annotate(proto, (loss, 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                        color="grey", ha="right", va="top", xytext=(-2, -2), textcoords="offset points")
        ax.set_ylim(-0.04, 1.08)
        ax.set_xlabel("held-out loss of the defended protocol (lower is better)")
        ax.set_ylabel(f"{ylabel} (lower is more private)")
        ax.set_title(ylabel, fontsize=10)
        ax.grid(alpha=0.3)
    if xlim:
        axes[0].set_xlim(*xlim)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(4, len(handles)), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    fig.savefig(path, dpi=100)
    return path
