"""Build a report from run directories: load, assemble sections, write HTML/MD/PNGs.

``build_report(run_paths, out_dir=None)`` returns the report directory.  The default
directory is ``<run>/report/`` for one run and ``reports/<timestamp>/`` for several.
Only saved artifacts are read; nothing is retrained.
"""
import datetime as dt
import logging
from pathlib import Path

from .doc import Document, Note, Section
from .extras import records_section, scenario_section, throughput_section
from .frontier import frontier_section
from .html import render_html
from .load import load_runs
from .markdown import render_markdown
from .privacy import attacks_section, dp_section
from .sections import communication_section, learning_section, memory_section, overview_section
from .seeds import expand, seeds_section
from .series import Context

log = logging.getLogger(__name__)

SECTIONS = (overview_section, seeds_section, learning_section, memory_section, communication_section,
            attacks_section, frontier_section, dp_section, throughput_section, records_section, scenario_section)
# PNG names the sections write; removed first so a re-run leaves no stale plot behind.
PNGS = ("loss_vs_step.png", "loss_vs_time.png", "memory.png", "bytes_per_link.png",
        "bytes_per_step.png", "attacks.png", "epsilon.png", "seeds.png", "exposure.png",
        "attacks_by_layer.png", "frontier.png")


def default_out_dir(run_paths, now=None):
    """``<run>/report`` for one run, else ``reports/<timestamp>`` (made unique)."""
    if len(run_paths) == 1:
        return Path(run_paths[0]) / "report"
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = path = Path("reports") / stamp
    i = 1
    while path.exists():
        path, i = base.with_name(f"{stamp}-{i}"), i + 1
    return path


def _section(builder, ctx):
    """One section; a builder that trips over unexpected data yields a note, not a crash,
    so the rest of the report is still written."""
    try:
        return builder(ctx)
    except Exception as exc:  # noqa: BLE001 -- the report must survive odd artifacts
        log.warning("report section %s failed", builder.__name__, exc_info=True)
        title = builder.__name__.removesuffix("_section").replace("_", " ").capitalize()
        return Section(title, [Note(f"this section could not be built: {type(exc).__name__}: {exc}")])


def build_document(runs, out_dir, seed_groups=()):
    """Assemble the document for loaded runs (PNGs are written into ``out_dir``);
    ``seed_groups``: [(parent, summary)] of runs over several seeds."""
    ctx = Context(runs, Path(out_dir))
    ctx.seed_groups = list(seed_groups)
    names = ", ".join(r.label for r in runs)
    title = f"Run report: {names}" if len(runs) == 1 else f"Comparison of {len(runs)} runs"
    subtitle = (f"{names} · generated {dt.datetime.now().isoformat(timespec='seconds')} "
                "from the saved run directories")
    sections = [s for s in (_section(b, ctx) for b in SECTIONS) if s is not None]
    return Document(title, subtitle, sections)


def build_report(run_paths, out_dir=None):
    """Write ``report.html``, ``report.md`` and the PNGs; return the report directory."""
    run_paths = [Path(p) for p in run_paths]
    if not run_paths:
        raise ValueError("run_paths: expected at least one run directory")
    expanded, groups = expand(run_paths)   # a seeds parent stands for its children
    runs = load_runs(expanded)  # first: a bad path fails before anything is written
    out = Path(out_dir) if out_dir else default_out_dir(run_paths)
    out.mkdir(parents=True, exist_ok=True)
    for name in PNGS:
        (out / name).unlink(missing_ok=True)
    doc = build_document(runs, out, groups)
    (out / "report.html").write_text(render_html(doc), encoding="utf-8")
    (out / "report.md").write_text(render_markdown(doc), encoding="utf-8")
    log.info("report written to %s", out)
    return out
