"""Plots of the privacy sections: attack scores on one panel per scale, exposure.

Sequence metrics (per position), canary recovery and token-set metrics measure different
things; a token-set recall of 0.85 is not "85 % of the text", so each family gets its
own panel and colour scale (:func:`score_panels`).
"""
import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after selecting the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .plots import WIDTH, _legend, _save  # noqa: E402

CMAPS = {"sequence": "Reds", "canary": "Purples", "set": "Oranges", "other": "Greys"}


def score_panels(rows, panels, path, title):
    """One heatmap panel per metric family, side by side, rows shared.

    ``rows``: row labels; ``panels``: [(family, title, cols, values)] with
    ``values[i][j]`` a float in [0, 1] or None (blank)."""
    import numpy as np
    widths = [max(1.4, 0.9 * len(cols) + 0.6) for _, _, cols, _ in panels]
    fig = Figure(figsize=(max(WIDTH, sum(widths) + 3.5), max(2.4, 0.42 * len(rows) + 1.9)))
    axes = fig.subplots(1, len(panels), sharey=True, gridspec_kw={"width_ratios": widths}, squeeze=False)[0]
    for k, (ax, (family, sub, cols, values)) in enumerate(zip(axes, panels)):
        data = np.array([[np.nan if v is None else float(v) for v in row] for row in values])
        cmap = matplotlib.colormaps[CMAPS.get(family, "Greys")].with_extremes(bad="#eeeeee")
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
        if k == 0:
            ax.set_yticks(range(len(rows)), rows, fontsize=8)
        for i in range(len(rows)):
            for j in range(len(cols)):
                v = data[i, j]
                ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if not np.isnan(v) and v > 0.6 else "black")
        ax.set_title(sub, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.08, pad=0.28, orientation="horizontal")
    fig.suptitle(title)
    return _save(fig, path)


def exposure_plot(series, path, max_bits):
    """Exposure (bits) per canary under each held model: [(model label, {canary: bits})]."""
    fig = Figure(figsize=(WIDTH, 4.2))
    ax = fig.add_subplot()
    canaries = sorted({c for _, vals in series for c in vals})
    n = max(1, len(series))
    for k, (label, vals) in enumerate(series):
        xs = [i + (k - (n - 1) / 2) * 0.8 / n for i in range(len(canaries))]
        ax.bar(xs, [vals.get(c, 0.0) for c in canaries], width=0.8 / n, label=label)
    ax.axhline(max_bits, color="grey", ls="--", lw=0.8)
    ax.text(len(canaries) - 0.5, max_bits, " max (rank 1)", va="bottom", ha="right", fontsize=8, color="grey")
    ax.set_xticks(range(len(canaries)), canaries, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("exposure (bits)")
    ax.set_title("Canary exposure (Secret Sharer) under each model an observer holds")
    ax.grid(alpha=0.3, axis="y")
    if series:
        _legend(ax)
    return _save(fig, path)


def layer_plot(series, path, xlabel="MoE layer", title="Leakage by layer (PC-MoE expert hosts, per position)"):
    """Per-position attack success against layer (or training step, with ``xlabel`` and
    ``title``): [(label, [{layer: {metric: value}}, ...])], one dict per observer.  Per label: the mean over observers (shaded: min–max), solid for
    token accuracy over every position, dashed for accuracy over the rows received; the
    legend has one entry per label and one per line style."""
    from matplotlib.lines import Line2D
    fig = Figure(figsize=(WIDTH, 4.2))
    ax = fig.add_subplot()
    for k, (label, observers) in enumerate(series):
        layers = sorted({x for obs in observers for x in obs},
                        key=lambda x: (0, int(x)) if str(x).isdigit() else (1, str(x)))
        xs = [int(x) if str(x).isdigit() else i for i, x in enumerate(layers)]
        color = f"C{k % 10}"
        for metric, style in (("token_accuracy", "-"), ("routed_accuracy", "--")):
            if not any(metric in obs[x] for obs in observers for x in obs):
                continue
            vals = [[obs[x].get(metric, 0.0) for obs in observers if x in obs] for x in layers]
            ax.plot(xs, [sum(v) / len(v) for v in vals], marker="o" if style == "-" else ".", ls=style,
                    color=color, label=label if style == "-" else None)
            if len(observers) > 1:
                ax.fill_between(xs, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.12,
                                lw=0)
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("per-position accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        handles, labels = ax.get_legend_handles_labels()
        handles.append(Line2D([], [], color="0.3", ls="-", marker="o"))
        labels.append("token accuracy (every position)")
        if any("routed_accuracy" in v for _, observers in series for obs in observers for v in obs.values()):
            handles.append(Line2D([], [], color="0.3", ls="--", marker="."))
            labels.append("accuracy on received rows")
        ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, path)
