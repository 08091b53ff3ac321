"""Read one run directory's saved artifacts into plain data for the report.

``load_run(path)`` never retrains and never fails on a missing piece: a crashed run,
a run without capture, without attacks or without a summary loads with those parts
empty (``None`` where "absent" and "empty" differ, as for ``attacks``).  Only a path
that is not a run directory at all raises :class:`~testbed.errors.ConfigError`.

Nothing here knows a protocol or an attack by name: whatever protocols wrote to
``metrics.jsonl`` and whatever ``attacks/*.json`` exist are what the report shows.
"""
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from testbed.errors import ConfigError
from testbed.rundir import iter_jsonl

log = logging.getLogger(__name__)

# Events every protocol writes; anything else is shown as a protocol-specific record.
CORE_EVENTS = ("train", "eval", "memory", "engine")


@dataclass
class Traffic:
    """What the capture index says about one protocol's messages."""

    messages: int = 0
    bytes: int = 0
    by_step: dict = field(default_factory=lambda: defaultdict(int))      # step -> bytes
    by_link: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # (src, dst) -> [msgs, bytes]
    by_kind: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # kind -> [msgs, bytes]


@dataclass
class Run:
    """Everything the report uses from one run directory."""

    path: Path
    scenario: dict = None          # scenario.yaml as data, or None
    manifest: dict = field(default_factory=dict)
    summary: dict = None           # summary.json, or None (e.g. a crashed run)
    metrics: list = field(default_factory=list)
    traffic: dict = field(default_factory=dict)    # protocol -> Traffic
    attacks: list = None           # attack results (reconstructions dropped); None: no attacks dir
    throughput: object = None      # throughput.json as data, or None
    vocab_size: int = None         # token ids in public/tokenizer.json, or None
    label: str = ""                # short name in legends, set by load_runs

    @property
    def name(self):
        return self.path.name

    @property
    def protocols(self):
        """Protocols in the order the run executed them (main protocol first)."""
        seen = []
        if self.scenario:
            seen = [self.scenario.get("protocol", {}).get("name")] + list(self.scenario.get("baselines") or [])
        for r in self.metrics:
            seen.append(r.get("protocol"))
        return [p for p in dict.fromkeys(seen) if p]

    def events(self, event, protocol=None):
        """Metrics records of one event type (optionally of one protocol)."""
        return [r for r in self.metrics if r.get("event") == event
                and (protocol is None or r.get("protocol") == protocol)]

    def other_events(self):
        """Event type -> records, for events beyond :data:`CORE_EVENTS`."""
        out = defaultdict(list)
        for r in self.metrics:
            if r.get("event") not in CORE_EVENTS:
                out[r.get("event", "?")].append(r)
        return dict(out)


def _jsonl(path):
    """Records of a JSON-lines file; unreadable lines (a torn write) are skipped."""
    out = []
    if not path.is_file():
        return out
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: unreadable line skipped", path, n)
    return out


def _json(path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as exc:
        log.warning("%s: unreadable (%s)", path, exc)
        return None


def _traffic(path):
    """Per-protocol aggregates of ``capture/index.jsonl``, streamed (it can be large)."""
    out = {}
    for rec in iter_jsonl(path / "capture" / "index.jsonl"):
        t = out.setdefault(rec.get("protocol", "?"), Traffic())
        n = int(rec.get("bytes") or 0)
        t.messages += 1
        t.bytes += n
        t.by_step[rec.get("step", -1)] += n
        for agg, key in ((t.by_link, (rec.get("src", "?"), rec.get("dst", "?"))),
                         (t.by_kind, rec.get("kind", "?"))):
            agg[key][0] += 1
            agg[key][1] += n
    return out


def _attacks(path):
    """Results in ``attacks/*.json`` without their (large) reconstructions; None when the
    directory does not exist."""
    d = path / "attacks"
    if not d.is_dir():
        return None
    out = []
    for f in sorted(d.glob("*.json")):
        data = _json(f)
        if not isinstance(data, dict) or "attack" not in data:
            continue
        data.pop("reconstructions", None)
        data["file"] = f.name
        out.append(data)
    return out


def _vocab_size(path):
    """How many token ids ``public/tokenizer.json`` defines (None: missing or unreadable);
    it can differ from ``data.tokenizer.vocab_size`` (a loaded tokenizer, a small corpus)."""
    try:
        data = json.loads((path / "public" / "tokenizer.json").read_text())
        vocab = (data.get("model") or {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))  # Unigram: a list
        ids += [t["id"] for t in data.get("added_tokens") or []]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None
    return max(ids) + 1 if ids else None


def load_run(path):
    """Load one run directory (see module docstring)."""
    path = Path(path)
    markers = ("scenario.yaml", "manifest.json", "metrics.jsonl")
    if not path.is_dir() or not any((path / m).is_file() for m in markers):
        raise ConfigError(path, [f"not a run directory (none of {', '.join(markers)} found)"])
    scenario = None
    if (path / "scenario.yaml").is_file():
        try:
            scenario = yaml.safe_load((path / "scenario.yaml").read_text())
        except yaml.YAMLError as exc:
            log.warning("%s: unreadable scenario.yaml (%s)", path, exc)
    return Run(path=path, scenario=scenario if isinstance(scenario, dict) else None,
               manifest=_json(path / "manifest.json") or {}, summary=_json(path / "summary.json"),
               metrics=_jsonl(path / "metrics.jsonl"), traffic=_traffic(path),
               attacks=_attacks(path), throughput=_json(path / "throughput.json"),
               vocab_size=_vocab_size(path))


def load_runs(paths):
    """Load several runs and give each a short, unique label (its scenario name when
    those are unique, else its directory name)."""
    runs = [load_run(p) for p in paths]
    names = [(r.scenario or {}).get("name") or r.name for r in runs]
    unique = len(set(names)) == len(names)
    for r, n in zip(runs, names):
        r.label = n if unique else r.name
    return runs
