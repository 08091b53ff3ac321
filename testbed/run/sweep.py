"""Run several scenarios, each in its own process, and collect how each ended.

Each scenario runs as ``python -m testbed run SCENARIO --json --no-progress``, so a crash
or a bad file fails that scenario alone; up to ``n_jobs`` run at once.  Used by
``python -m testbed sweep`` and by the privacy regression gate.
"""
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One scenario to run: its file, ``--set KEY=VALUE`` overrides, run directory name."""

    scenario: str
    sets: list = field(default_factory=list)
    name: str = None
    label: str = None
    seeds: str = None        # "0,1,2": each scenario over several seeds (a seeds parent run)

    def __post_init__(self):
        self.label = self.label or Path(self.scenario).name


@dataclass
class Result:
    """How one job ended: ``ok``, exit code, run directory (None if none was made),
    the run's summary (ok runs), the error (failed ones) and wall seconds."""

    job: Job
    ok: bool
    returncode: int
    run_dir: Path = None
    summary: dict = None
    error: str = ""
    seconds: float = 0.0


def sets_from_dict(overrides):
    """{'model': {'num_layers': 2}, 'baselines': []} -> ['model={"num_layers": 2}', 'baselines=[]']
    (JSON is YAML, which is how ``--set`` values are parsed; mappings merge key by key)."""
    return [f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items()]


def parse_summary(stdout):
    """The JSON summary ``testbed run --json`` printed (anything a protocol printed before
    it is skipped), or None."""
    decoder, start = json.JSONDecoder(), 0
    for line in stdout.splitlines(keepends=True):
        if line.startswith("{"):
            try:
                obj, _ = decoder.raw_decode(stdout[start:])
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict) and "run" in obj:
                return obj
        start += len(line)
    return None


def _partial_dir(stderr):
    for line in stderr.splitlines():
        if line.startswith("run directory (partial):"):
            return Path(line.split(":", 1)[1].strip())
    return None


def _error_line(stderr):
    """The CLI's ``error: ...`` block (its indented problem lines joined), else the last
    line of stderr (a traceback's exception)."""
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    for i, line in enumerate(lines):
        if line.startswith("error:"):
            block = [line]
            for more in lines[i + 1:]:
                if not more.startswith((" ", "\t")):
                    break
                block.append(more.strip())
            return " ".join(block)
    return lines[-1].strip() if lines else "no output"


def run_job(job, runs_root, threads=None, timeout=None, cwd=None):
    """Run one job in a subprocess (in ``cwd``, default the current directory); never
    raises for a failing scenario."""
    cmd = [sys.executable, "-m", "testbed", "run", str(job.scenario), "--runs", str(runs_root),
           "--json", "--no-progress", "--no-report"]
    if job.name:
        cmd += ["--name", job.name]
    if job.seeds:
        cmd += ["--seeds", str(job.seeds)]
    for s in job.sets:
        cmd += ["--set", s]
    env = dict(os.environ)
    if threads:
        # parallel jobs share the cores: one torch thread pool each, sized to its share
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, str(threads))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        return Result(job, False, 124, error=f"timed out after {exc.timeout:.0f} s",
                      seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    summary = parse_summary(proc.stdout) if proc.returncode == 0 else None
    here = Path(cwd or ".")
    if proc.returncode == 0 and summary is not None:
        return Result(job, True, 0, here / summary["run"], summary, seconds=seconds)
    error = _error_line(proc.stderr) if proc.returncode else "exit 0 but no JSON summary on stdout"
    log.debug("%s stderr:\n%s", job.label, proc.stderr)
    partial = _partial_dir(proc.stderr)
    return Result(job, False, proc.returncode or 1, partial and here / partial, error=error, seconds=seconds)


def default_jobs(n):
    return max(1, min(os.cpu_count() or 1, n))


def run_scenarios(jobs, runs_root, n_jobs=None, on_done=None, timeout=None, cwd=None):
    """Run ``jobs`` (list of :class:`Job`), ``n_jobs`` at a time; call ``on_done(result,
    done, total)`` as each finishes; return the results in the jobs' order.  ``runs_root``
    and relative scenario paths are taken relative to ``cwd`` (default: here)."""
    n_jobs = n_jobs or default_jobs(len(jobs))
    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    Path(cwd or ".", runs_root).mkdir(parents=True, exist_ok=True)
    results = [None] * len(jobs)
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        futures = {pool.submit(run_job, job, runs_root, threads, timeout, cwd): i for i, job in enumerate(jobs)}
        for done, fut in enumerate(as_completed(futures), 1):
            i = futures[fut]
            results[i] = fut.result()
            if on_done:
                on_done(results[i], done, len(jobs))
    return results


def format_result(res, done, total):
    """One line per finished scenario."""
    head = f"[{done}/{total}] {'ok    ' if res.ok else 'FAILED'} {res.job.label:<28} {res.seconds:6.1f}s"
    if res.ok:
        protos = (res.summary.get("protocols") or {}).values()
        if res.summary.get("kind") == "seeds":     # mean ± 95% CI over the seeds
            from testbed.stats import fmt_ci
            losses = " ".join(fmt_ci(p["final"], 3) for p in protos)
        else:
            losses = " ".join(f"{x:.3f}" for x in (p.get("mean_eval_loss") for p in protos) if x is not None)
        return f"{head}  eval loss {losses or '-'}  {res.run_dir}"
    return f"{head}  exit {res.returncode}: {res.error}" + (f"  (partial: {res.run_dir})" if res.run_dir else "")
