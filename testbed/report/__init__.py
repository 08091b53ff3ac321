"""Reports: turn saved run directories into one page a person reads at a glance.

    python -m testbed.report runs/A [runs/B ...] [-o DIR]

writes ``report.html`` (self-contained: images embedded, no external files or scripts),
``report.md`` and the PNG plots: loss vs step and vs simulated time, peak memory per
party next to centralized, bytes per link and per step, the attack x protocol x metric
matrix, DP epsilon, PrivateLoRA throughput tables and each run's scenario.  Only the
run directories' artifacts are read (see :mod:`testbed.report.load`); protocols and
attacks are discovered from them, never named in this package.

Modules: ``load`` (artifacts -> data), ``series`` (derived numbers, labels, colours),
``sections`` / ``privacy`` / ``extras`` (the document's sections), ``plots`` (PNGs),
``doc`` (document model), ``html`` and ``markdown`` (renderers), ``build`` (all of it).
"""
from .build import build_report, default_out_dir
from .load import load_run, load_runs

__all__ = ["build_report", "default_out_dir", "load_run", "load_runs"]
