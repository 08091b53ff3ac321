"""PNG plots for the report (matplotlib, Agg: no display needed).

Each function takes plain series (already extracted from the run directories by the
section builders), writes one PNG and returns its path.  Figures are built with the
object API (``matplotlib.figure.Figure``), never pyplot's global state, so building
several reports in one process cannot mix figures up.
"""
import math

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after selecting the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from testbed.errors import fmt_bytes  # noqa: E402

DPI = 100
WIDTH = 10.0
MEMORY_PARTS = ("params", "grads", "optimizer", "activations")
MEMORY_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52")


def palette(keys):
    """key -> a colour, stable in the order given (tab10, then tab20 past ten keys)."""
    cmap = matplotlib.colormaps["tab10" if len(keys) <= 10 else "tab20"]
    return {k: cmap(i % cmap.N) for i, k in enumerate(keys)}


def _crowded(labels):
    """Whether category labels would collide under vertical bars."""
    return len(labels) * max((len(x.split("\n")[0]) for x in labels), default=0) > 110


def _bar_figure(labels, height=4.8):
    """(figure, axes, horizontal): vertical bars for a few short labels; horizontal bars,
    one label line each, when they would collide (the figure grows with the count)."""
    horizontal = _crowded(labels)
    fig = Figure(figsize=(WIDTH, max(height, 0.32 * len(labels) + 1.4) if horizontal else height))
    ax = fig.add_subplot()
    if horizontal:
        ax.set_yticks(range(len(labels)), [x.replace("\n", " · ") for x in labels], fontsize=8)
        ax.invert_yaxis()  # first bar on top, as in the tables
    else:
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
    return fig, ax, horizontal


def _legend(ax):
    """Legend outside the axes, on the right, so it never hides a bar or a curve."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _finite(points):
    return [(x, y) for x, y in points if y is not None and math.isfinite(y) and x is not None]


def _band(points):
    """(x, mean, lo, hi) tuples with a finite mean, as four lists."""
    points = [p for p in points if p[0] is not None and p[1] is not None and math.isfinite(p[1])]
    return [list(c) for c in zip(*points)] if points else None


def loss_figure(series, xlabel, title):
    """One axis, one train line and one eval line per series, each the mean over parties:
    train solid with its min-max over parties shaded, eval dashed with markers and the
    min-max as error bars (several series' eval points nudged sideways, so they do not hide
    each other).

    ``series``: [(label, colour, train band, eval band)], a band a list of
    (x, mean, min, max) (:func:`testbed.report.series.train_band` / ``eval_band``)."""
    fig = Figure(figsize=(WIDTH, 4.8))
    ax = fig.add_subplot()
    xs = [p[0] for _, _, train, evals in series for p in train + evals if p[0] is not None]
    # eval points of several series at the same step, nudged apart so their error bars show
    nudge = 0.008 * (max(xs) - min(xs)) if len(series) > 1 and xs else 0.0
    for i, (label, color, train, evals) in enumerate(series):
        band = _band(train)
        if band:
            x, mean, lo, hi = band
            ax.plot(x, mean, color=color, lw=1.4, label=f"{label} train")
            if any(h > low for low, h in zip(lo, hi)):
                ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)
        band = _band(evals)
        if band:
            x, mean, lo, hi = band
            x = [v + (i - (len(series) - 1) / 2) * nudge for v in x]
            err = [[m - low for m, low in zip(mean, lo)], [h - m for m, h in zip(mean, hi)]]
            ax.errorbar(x, mean, yerr=err if any(map(any, err)) else None, color=color, ls="--",
                        marker="o", ms=4, lw=1.2, capsize=3, label=f"{label} eval")
    if xlabel == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (cross-entropy, nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        _legend(ax)
    return fig


def loss_plot(series, path, xlabel, title):
    """:func:`loss_figure` written to ``path``."""
    return _save(loss_figure(series, xlabel, title), path)


def memory_plot(bars, path):
    """Stacked bars of peak memory per role: params / grads / optimizer / activations.

    ``bars``: [(label, {part: bytes}, budget or None)]."""
    fig, ax, horizontal = _bar_figure([b[0] for b in bars])
    bar = ax.barh if horizontal else ax.bar
    xs = range(len(bars))
    base = [0.0] * len(bars)
    for part, color in zip(MEMORY_PARTS, MEMORY_COLORS):
        vals = [float(parts.get(part) or 0) / 2**20 for _, parts, _ in bars]
        bar(xs, vals, 0.7, base, color=color, label=part)
        base = [b + v for b, v in zip(base, vals)]
    drawn = False
    for x, (_, _, budget) in zip(xs, bars):
        # a budget far above every bar would squash the bars; the table lists it anyway
        if budget and budget / 2**20 < 1.5 * max(base + [1e-9]):
            line = ax.vlines if horizontal else ax.hlines
            line(budget / 2**20, x - 0.4, x + 0.4, colors="black", linestyles=":", lw=1.5)
            drawn = True
    (ax.set_xlabel if horizontal else ax.set_ylabel)("peak memory (MiB)")
    ax.set_title("Peak memory per role" + (" (dotted: budget)" if drawn else ""))
    ax.grid(axis="x" if horizontal else "y", alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def link_bytes_plot(rows, path):
    """Grouped bars of bytes up / down per link. ``rows``: [(label, up, down)]."""
    fig, ax, horizontal = _bar_figure([r[0] for r in rows], height=4.5)
    bar = ax.barh if horizontal else ax.bar
    xs = list(range(len(rows)))
    top = max([max(r[1], r[2]) for r in rows] + [1])
    scale = _bytes_scale(top)
    bar([x - 0.2 for x in xs], [r[1] / scale[1] for r in rows], 0.4, label="up (role sends)", color="#4C72B0")
    bar([x + 0.2 for x in xs], [r[2] / scale[1] for r in rows], 0.4, label="down (role receives)",
        color="#DD8452")
    (ax.set_xlabel if horizontal else ax.set_ylabel)(f"{scale[0]} (max {fmt_bytes(top)})")
    ax.set_title("Bytes per link")
    ax.grid(axis="x" if horizontal else "y", alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def step_bytes_plot(series, path):
    """Bytes on the wire per step, one line per series: [(label, colour, [(step, bytes)])]."""
    fig = Figure(figsize=(WIDTH, 4.2))
    ax = fig.add_subplot()
    scale = _bytes_axis(ax, max([1] + [b for _, _, points in series for _, b in points]))
    for label, color, points in series:
        points = sorted(points)
        if points:
            ax.plot([s for s, _ in points], [b / scale for _, b in points], color=color, marker=".",
                    lw=1.2, label=label)
    top = max([b / scale for _, _, points in series for _, b in points] + [1e-9])
    ax.set_ylim(0, top * 1.12)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_title("Bytes on the wire per step (capture index)")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def _bytes_scale(top):
    """(unit, divisor): the binary unit that fits the largest value, so ticks land on
    round numbers of that unit."""
    unit, scale = "B", 1
    for u, s in (("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30)):
        if top >= s:
            unit, scale = u, s
    return unit, scale


def _bytes_axis(ax, top):
    """Label the y axis in the unit of :func:`_bytes_scale`; returns the divisor."""
    unit, scale = _bytes_scale(top)
    ax.set_ylabel(f"{unit} (max {fmt_bytes(top)})")
    return scale


def heatmap(rows, cols, values, path, title):
    """A 0..1 heatmap with each cell's value written in it (blank: not measured).

    ``values[i][j]`` is a float or None."""
    import numpy as np
    data = np.array([[np.nan if v is None else float(v) for v in row] for row in values])
    fig = Figure(figsize=(max(6.0, 1.1 * len(cols) + 3.5), max(2.2, 0.45 * len(rows) + 1.6)))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["Reds"].with_extremes(bad="#eeeeee")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = data[i, j]
            text = "-" if np.isnan(v) else f"{v:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if not np.isnan(v) and v > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="score (1 = full leak)")
    ax.set_title(title)
    return _save(fig, path)


def epsilon_plot(series, path):
    """DP epsilon spent over steps: [(label, colour, [(step, epsilon)])]."""
    fig = Figure(figsize=(WIDTH, 4.2))
    ax = fig.add_subplot()
    for label, color, points in series:
        points = _finite(sorted(points))
        if points:
            ax.plot(*zip(*points), color=color, marker=".", lw=1.2, label=label)
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("ε spent (at the run's δ)")
    ax.set_title("Differential privacy budget spent")
    ax.grid(alpha=0.3)
    if ax.lines:
        _legend(ax)
    return _save(fig, path)
