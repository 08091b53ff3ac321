"""Reports: turn saved run directories into one page a person reads at a glance.

    python -m testbed.report runs/A [runs/B ...] [-o DIR]

writes ``report.html`` (self-contained: images embedded, no external files or scripts),
``report.md`` and the PNG plots: loss vs step and vs simulated time (per protocol the
mean over parties with their min-max as a band), peak memory per party next to
centralized, bytes per link and per step, the attack x protocol x metric matrix (one
table per metric family), DP epsilon, PrivateLoRA throughput tables and each run's
scenario (without the model keys its family ignores).  A caveat says when compared runs
differ in vocabulary or data, so that their losses are not comparable.  Tables keep to
:data:`~testbed.report.doc.MAX_COLUMNS` columns, so they fit a page about 1000 px wide.
Only the run directories' artifacts are read (see :mod:`testbed.report.load`); protocols
and attacks are discovered from them, never named in this package.

Modules: ``load`` (artifacts -> data), ``series`` (derived numbers, labels, colours),
``caveats`` (whether losses compare), ``sections`` / ``privacy`` / ``extras`` (the
document's sections), ``plots`` (PNGs), ``doc`` (document model), ``html`` and
``markdown`` (renderers), ``build`` (all of it).
"""
from .load import load_run, load_runs

__all__ = ["build_report", "default_out_dir", "load_run", "load_runs"]


def __getattr__(name):
    # the builder imports matplotlib (a second or more): only when a report is written, so that
    # ``python -m testbed.report`` checks its arguments first
    if name in ("build_report", "default_out_dir"):
        from . import build
        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
