"""The run directory: the contract between engines, attacks and reports.

::

    runs/<scenario>-<timestamp>/
      scenario.yaml      resolved scenario as run
      manifest.json      seed, versions, testbed {version, commit, dirty}, host, mode,
                         scenario hash, start/end, exit status
      metrics.jsonl      one line per event
      capture/           index.jsonl + tensors/*.safetensors (see testbed.run.capture)
      public/            what every party may know: tokenizer.json, the starting checkpoint
      truth/             private ground truth, for scoring only: tokens.jsonl (token ids
                         per protocol, party and step; ``canaries``: which rows carry
                         which canary, at which token positions), canaries.json,
                         records.jsonl, routes.jsonl (PC-MoE: the batch row and position
                         of every row of every routed training message, in the order
                         sent; dummy rows [-1, -1]; disguised evaluation flagged eval)
      attacks/, report/

Every file is written incrementally (append + flush) so a crash leaves everything up
to the last finished step readable; ``manifest.json`` says ``status: running`` until
the run ends, then ``ok`` or ``failed`` with the error.
"""
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from . import __version__


def _now():
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _versions():
    out = {"python": sys.version.split()[0], "testbed": __version__}
    for mod in ("torch", "transformers", "simpy", "opacus", "tokenizers", "safetensors", "pydantic"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # an optional package missing is recorded, not fatal
            out[mod] = None
    return out


def git_state(root=Path(__file__).resolve().parents[1]):
    """{"commit": HEAD's sha, "dirty": uncommitted changes to tracked or new files} of the
    checkout at ``root``; both None when it is not a git checkout (an installed package, a
    container image) or git is missing."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=normal")
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(),
            "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def testbed_identity():
    """What produced a run: the testbed's version, git commit and whether the tree was dirty."""
    return {"version": __version__, **git_state()}


class RunDir:
    """Creates and writes one run directory."""

    def __init__(self, root, scenario, mode="embedded", name=None):
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(root) / (name or f"{scenario.name}-{stamp}")
        path, i = base, 1
        while path.exists():
            path, i = base.with_name(f"{base.name}-{i}"), i + 1
        self.path = path
        for sub in ("capture/tensors", "truth", "public", "attacks", "report"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        (path / "scenario.yaml").write_text(yaml.safe_dump(scenario.resolved(), sort_keys=False))
        self.manifest = {
            "scenario": scenario.name, "scenario_hash": scenario.digest(), "seed": scenario.seed,
            "mode": mode, "status": "running", "start": _now(), "end": None, "error": None,
            "host": {"hostname": socket.gethostname(), "platform": platform.platform(),
                     "cpus": os.cpu_count()},
            "versions": _versions(), "testbed": testbed_identity(), "argv": sys.argv,
        }
        self._write_manifest()
        self._metrics = open(path / "metrics.jsonl", "a", buffering=1)
        self._truth = open(path / "truth" / "tokens.jsonl", "a", buffering=1)
        self._canaries = None   # read from truth/canaries.json at the first truth record
        self._routes = None     # truth/routes.jsonl, opened by the first routed message

    def _write_manifest(self):
        tmp = self.path / "manifest.json.tmp"
        tmp.write_text(json.dumps(self.manifest, indent=2))
        os.replace(tmp, self.path / "manifest.json")

    def update_manifest(self, **fields):
        self.manifest.update(fields)
        self._write_manifest()

    def metric(self, record):
        self._metrics.write(json.dumps(record, sort_keys=True) + "\n")

    def write_json(self, rel, obj):
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(obj, indent=2))

    def truth(self, protocol, party, step, input_ids):
        """Record the private token ids ``party`` trained on at ``step`` (scoring only),
        with the canaries of ``truth/canaries.json`` its rows carry."""
        if self._canaries is None:
            p = self.path / "truth" / "canaries.json"
            self._canaries = json.loads(p.read_text()) if p.is_file() else []
        rows = input_ids.tolist()
        self._truth.write(json.dumps({"protocol": protocol, "party": party, "step": step,
                                      "input_ids": rows,
                                      "canaries": canary_hits(rows, self._canaries)}) + "\n")

    def route(self, protocol, party, step, layer, host, positions, eval=False):
        """Record, for one routed message of ``party`` to ``host`` at ``step`` and ``layer``,
        the (batch row, position) of the token each of its rows carries (scoring only:
        ``truth/routes.jsonl``; the message itself carries no positions)."""
        if self._routes is None:
            self._routes = open(self.path / "truth" / "routes.jsonl", "a", buffering=1)
        self._routes.write(json.dumps(route_record(protocol, party, step, layer, host, positions, eval)) + "\n")

    def close(self, status="ok", error=None):
        self._metrics.close()
        self._truth.close()
        if self._routes is not None:
            self._routes.close()
        self.update_manifest(status=status, error=error, end=_now())


def route_record(protocol, party, step, layer, host, positions, eval=False, **extra):
    """One line of ``truth/routes.jsonl`` (``extra``: e.g. a part's timestamp)."""
    return {"protocol": protocol, "party": party, "step": step, "layer": layer, "host": host,
            "positions": positions, **({"eval": True} if eval else {}), **extra}


def canary_hits(rows, canaries):
    """Where the canaries occur in ``rows`` (lists of token ids): one
    ``{"row", "canary", "start", "end"}`` per occurrence of a canary's ``token_ids`` (the
    value's tokens as encoded in its record) as a contiguous run of a row."""
    out = []
    for c in canaries:
        pat = c.get("token_ids")
        if not pat:
            continue
        n = len(pat)
        for r, row in enumerate(rows):
            for s in range(len(row) - n + 1):
                if row[s] == pat[0] and row[s:s + n] == pat:
                    out.append({"row": r, "canary": c["id"], "start": s, "end": s + n})
    return out


RUN_MARKERS = ("scenario.yaml", "manifest.json", "metrics.jsonl")


def check_run_dir(path, needs=RUN_MARKERS[:1]):
    """``path`` as a Path when it is a run directory holding every file of ``needs``; else a
    one-line ConfigError naming it ("not a run directory (...)")."""
    from .errors import ConfigError
    path = Path(path)
    if not path.exists():
        raise ConfigError(path, ["not a run directory (it does not exist)"])
    missing = [m for m in needs if not (path / m).is_file()]
    if not path.is_dir() or missing:
        raise ConfigError(path, [f"not a run directory (no {', '.join(missing) or 'files'})"])
    return path


def iter_jsonl(path):
    """Records of a JSON-lines file written incrementally; stops at a torn last line (a
    crash mid-write) and yields nothing for a missing file."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                return


def read_metrics(path):
    """All records of a run directory's metrics.jsonl (a torn last line is skipped)."""
    return list(iter_jsonl(Path(path) / "metrics.jsonl"))
