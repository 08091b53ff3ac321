"""Report sections that describe rather than measure: the scenarios as run, the run
environment, PrivateLoRA throughput tables and any protocol-specific metrics records.

Protocol-specific records are every ``metrics.jsonl`` event beyond train / eval /
memory / engine (e.g. PrivateLoRA's ``privatelora`` and ``generate`` records); they
are shown generically, so a new protocol's records appear without changes here.
"""
from collections import defaultdict

from testbed.scenario import model_key_applies

from .doc import Note, Section, Table, flatten, fmt_cell, fmt_time, split_columns

MAX_CELL = 90
MAX_RECORDS = 12
SKIP_FIELDS = {"event", "protocol", "role", "wall_time"}


def _short(v):
    s = fmt_cell(v)
    return s if len(s) <= MAX_CELL else s[:MAX_CELL - 1] + "…"


def scenario_keys(scenario):
    """The scenario flattened to {dotted key: value}, without the model keys its model
    family ignores (a dense LLaMA's num_experts, top_k, router_aux_loss_coef)."""
    if not scenario:
        return {}
    family = (scenario.get("model") or {}).get("family")
    return {k: v for k, v in flatten(scenario)
            if not (k.startswith("model.") and family and not model_key_applies(family, k.split(".")[1]))}


def scenario_section(ctx):
    """Each run's resolved scenario as a table (runs side by side), differences first;
    a key that does not apply to a run (its model family ignores it) reads "n/a"."""
    sec = Section("Scenario")
    flat = [scenario_keys(r.scenario) for r in ctx.runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    missing = [r.label for r, f in zip(ctx.runs, flat) if not f]
    for label in missing:
        sec.add(Note(f"{label}: no scenario.yaml"))
    if not keys:
        return sec
    labels = [r.label for r in ctx.runs]
    rows = [[k] + [_short(f[k]) if k in f else "n/a" if f else "-" for f in flat] for k in keys]
    if len(ctx.runs) > 1:
        diff = [row for row in rows if len(set(row[1:])) > 1]
        sec.add(Table(["key"] + labels, diff, caption="Keys whose values differ between the runs.")
                if diff else Note("the runs' scenarios are identical"))
    sec.add(Table(["key"] + (labels if len(labels) > 1 else ["value"]), rows,
                  caption="Every key of the resolved scenario (scenario.yaml), defaults filled in.",
                  collapsed=len(ctx.runs) > 1))
    env = []
    for r in ctx.runs:
        m, v, host = r.manifest, r.manifest.get("versions") or {}, r.manifest.get("host") or {}
        cpus = f" ({fmt_cell(host['cpus'])} cpus)" if host.get("cpus") else ""
        env.append([r.label, fmt_cell(m.get("seed")), m.get("scenario_hash") or "-",
                    (host.get("hostname") or "-") + cpus,
                    ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "transformers") if v.get(k)) or "-",
                    fmt_time(m.get("start")), fmt_time(m.get("end"))])
    sec.add(Table(["run", "seed", "scenario hash", "host", "versions", "start", "end"], env,
                  caption="Run environment (manifest.json)."))
    return sec


def _tables_from(data, caption):
    """Generic tables for a JSON value: a list of records, a mapping of records or lists
    of records, or plain key/value pairs."""
    if isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        cols = list(dict.fromkeys(k for x in data for k in x))
        return split_columns(Table(cols, [[_short(x.get(c, "-")) for c in cols] for x in data], caption=caption))
    if not isinstance(data, dict):
        return [Table(["value"], [[_short(data)]], caption=caption)]
    out, plain = [], []
    for k, v in data.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out += _tables_from(v, f"{caption}: {k}")
        elif isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            cols = list(dict.fromkeys(c for x in v.values() for c in x))
            out += split_columns(Table([""] + cols, [[str(name)] + [_short(x.get(c, "-")) for c in cols]
                                                     for name, x in v.items()], caption=f"{caption}: {k}"))
        else:
            plain += [[key, _short(x)] for key, x in flatten({k: v})]
    if plain:
        out.insert(0, Table(["key", "value"], plain, caption=caption))
    return out


def throughput_section(ctx):
    """Tables from each run's ``throughput.json``; None when no run has one and none is
    a PrivateLoRA run (the section would say nothing)."""
    have = [r for r in ctx.runs if r.throughput is not None]
    plora = [r for r in ctx.runs if any("privatelora" in p for p in r.protocols)]
    if not have and not plora:
        return None
    sec = Section("PrivateLoRA throughput")
    for r in ctx.runs:
        if r.throughput is not None:
            sec.add(*_tables_from(r.throughput, f"{r.label}: throughput.json"))
        elif r in plora:
            sec.add(Note(f"{r.label}: no throughput.json in the run directory"))
    return sec


def records_section(ctx):
    """Every protocol-specific metrics event, one table per (run, protocol, event); None
    when there are none."""
    groups = defaultdict(list)
    for r in ctx.runs:
        for event, recs in r.other_events().items():
            for rec in recs:
                groups[(r.label, rec.get("protocol", "?"), event)].append((r, rec))
    if not groups:
        return None
    sec = Section("Protocol records")
    sec.add("Metrics records beyond train / eval / memory / engine, as the protocols wrote them.")
    for (_, protocol, event), items in groups.items():
        run = items[0][0]
        flat = [dict((k, v) for k, v in flatten(rec) if k not in SKIP_FIELDS) for _, rec in items]
        caption = f"{ctx.label(run, protocol)}: {event} record{'s' if len(flat) > 1 else ''}"
        if len(flat) == 1:  # one record reads better as key / value rows
            sec.add(Table(["field", "value"], [[k, _short(v)] for k, v in flat[0].items()], caption=caption))
            continue
        cols = list(dict.fromkeys(k for f in flat for k in f))
        rows = [[_short(f.get(c, "-")) for c in cols] for f in flat[:MAX_RECORDS]]
        more = f" (first {MAX_RECORDS} of {len(flat)})" if len(flat) > MAX_RECORDS else ""
        sec.add(*split_columns(Table(cols, rows, caption=caption + more)))
    return sec
