"""Grids of settings for a sweep: ``--grid KEY=V1,V2,...`` gives one run per value.

Several ``--grid`` options give the cartesian product.  Each value is a YAML value, as
with ``--set`` (which it is, once expanded: ``KEY=V`` is appended to the run's ``--set``
list, so a grid value wins over a ``--set`` of the same key).  Values are split on the
commas outside brackets, braces and quotes, so a value may itself be a list or a mapping:

    --grid defences.0.sigma=0,0.01,0.1
    --grid 'defences=[],[{type: topk, fraction: 0.1}]'
    --grid protocol.options.noise_sigma=0,0.1 --grid training.lr=0.001,0.003

What a run was given is in its ``scenario.yaml``; the report finds the swept keys there
(the keys whose values differ between the runs, see :mod:`testbed.report.frontier`).
"""
import itertools
import re

import yaml

from testbed.errors import ConfigError

OPEN, CLOSE = "[{(", "]})"


def split_values(raw):
    """'0,0.1,[a, b]' -> ['0', '0.1', '[a, b]']: commas inside brackets or quotes stay."""
    out, depth, quote, cur = [], 0, None, ""
    for c in raw:
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in OPEN:
            depth += 1
        elif c in CLOSE:
            depth -= 1
        elif c == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += c
    out.append(cur.strip())
    return out


def parse_grid(items):
    """['a.b=1,2'] -> [('a.b', [('1', 1), ('2', 2)])]: each key with its values, raw text and
    parsed YAML.  ConfigError naming ``--grid`` with every malformed item (no ``=``, an
    empty key part, an empty or invalid value, a repeated value or key)."""
    grid, problems, seen = [], [], set()
    for item in items or []:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key or not all(key.split(".")):
            problems.append(f"{item!r}: expected KEY=V1,V2,... with a dotted key, e.g. defences.0.sigma=0,0.1")
            continue
        if key in seen:
            problems.append(f"{key}: given twice; list every value in one --grid {key}=V1,V2,...")
            continue
        seen.add(key)
        values, bad = [], []
        for text in split_values(raw):
            if not text:
                bad.append(f"{key}: empty value in {raw!r} (null for none)")
                continue
            try:
                values.append((text, yaml.safe_load(text)))
            except yaml.YAMLError as exc:
                bad.append(f"{key}: {text!r} is not valid YAML ({str(exc).splitlines()[0]})")
        parsed = [v for _, v in values]
        if not bad and any(parsed[i] in parsed[:i] for i in range(len(parsed))):
            bad.append(f"{key}: a value is repeated in {raw!r}")
        problems += bad
        if not bad:
            grid.append((key, values))
    if problems:
        raise ConfigError("--grid", problems)
    return grid


def short_key(key):
    """'defences.0.sigma' -> 'sigma': the last part that is not an item number."""
    parts = [p for p in key.split(".") if not p.isdigit()]
    return parts[-1] if parts else key


def slug(text, limit=32):
    """A run-directory-safe rendering of a value: '0.1' -> '0.1', '[{type: topk}]' -> 'type-topk'."""
    s = re.sub(r"[^A-Za-z0-9_.+]+", "-", str(text)).strip("-.")
    return (s or "none")[:limit]


def expand(grid):
    """The cartesian product of a parsed grid: [(name suffix, ['KEY=V', ...], {key: V})],
    in the order the values were given (the first key varies slowest).  An empty grid is
    one point with no settings."""
    if not grid:
        return [("", [], {})]
    out = []
    for combo in itertools.product(*[[(key, text, value) for text, value in values] for key, values in grid]):
        suffix = "-".join(f"{short_key(k)}{slug(t)}" for k, t, _ in combo)
        out.append((suffix, [f"{k}={t}" for k, t, _ in combo], {k: t for k, t, _ in combo}))
    return out


def problem_key(problem):
    """The dotted key a problem names and the rest: 'protocol.options: noise_sigma: must be
    ...' -> ('protocol.options.noise_sigma', 'must be ...') (heads without spaces, joined)."""
    parts = problem.split(": ")
    n = 0
    while n < len(parts) - 1 and re.fullmatch(r"[A-Za-z0-9_.\-]+", parts[n]):
        n += 1
    return ".".join(parts[:n]), ": ".join(parts[n:])


def grid_problems(points, load):
    """Check every point of a grid before anything runs.  ``points``: [(sets, settings)]
    with ``settings`` {key: value text}; ``load(sets)`` loads the scenario with those
    ``--set`` items and returns its problems (or raises ConfigError).  Returns the problems
    of a grid key (the key, a key under it or the list item it is in), once each:
    ``KEY=V1,V2: problem`` for the values that have it, ``KEY: problem`` when every value
    has it.  The other problems are the scenario's own: they fail its runs, as a sweep's
    runs always do."""
    found = {}     # (key, problem) -> value texts, in order
    for sets, settings in points:
        try:
            problems = load(sets)
        except ConfigError as exc:
            problems = exc.problems
        for p in problems:
            p = p.removesuffix(" (given with --set)")
            head, rest = problem_key(p)
            key = next((k for k in settings if head and (head == k or head.startswith(k + ".")
                                                         or k.startswith(head + "."))), None)
            if key:
                texts = found.setdefault((key, rest if head == key else p), [])
                texts += [settings[key]] if settings[key] not in texts else []
    values = {}
    for _, settings in points:
        for k, t in settings.items():
            values.setdefault(k, set()).add(t)
    return [f"{key}: {p}" if len(texts) == len(values[key]) else f"{key}={','.join(texts)}: {p}"
            for (key, p), texts in found.items()]
