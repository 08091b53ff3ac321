"""Run attacks on a finished run directory, score them, write ``attacks/<attack>-<observer>.json``.

``run_attacks(run_path, attack_specs)`` is what ``python -m attacks run`` and the testbed
runner (a scenario's ``attacks:`` list) call.  A spec is an attack name or a dict
``{name, observer, options}``.  Each attack runs once per observer -- the one given, or
every observer of :mod:`attacks.observers` that receives a kind the attack consumes --
on an :class:`~attacks.view.AdversaryView` limited to its threat model's knowledge; the
reconstructions are then scored against ``truth/`` by :mod:`attacks.score`.  An attack
that does not target the run's protocol is skipped with a note (and a JSON saying so).
"""
import fnmatch
import json
import logging
import time
from pathlib import Path

import yaml

from testbed.errors import ConfigError
from testbed.rundir import iter_jsonl

from . import observers as obs
from .registry import get_attack
from .score import Scorer
from .view import WIRE, AdversaryView

log = logging.getLogger(__name__)

SPEC_KEYS = ("name", "observer", "options")
# (result key, column title, format) for the printed table
COLUMNS = [("rows", "rows", "{:d}"), ("token_accuracy", "tok_acc", "{:.3f}"), ("rouge1", "rouge1", "{:.3f}"),
           ("rouge2", "rouge2", "{:.3f}"), ("rougeL", "rougeL", "{:.3f}"), ("exact_match", "exact", "{:.3f}"),
           ("canary_recovery", "canary", "{:.3f}"), ("token_set_recall", "set_rec", "{:.3f}"),
           ("token_set_precision", "set_prec", "{:.3f}"), ("seconds", "seconds", "{:.2f}")]


def parse_specs(specs, where="attacks", lookup=get_attack):
    """Normalise a scenario's ``attacks:`` list to dicts; every problem raised together.
    ``lookup(name)`` gives the attack (:func:`attacks.catalog.describe` checks without torch)."""
    out, problems = [], []
    for i, spec in enumerate(specs or []):
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            problems.append(f"{i}: expected an attack name or a mapping with 'name' (got {spec!r})")
            continue
        extra = sorted(set(spec) - set(SPEC_KEYS))
        if extra:
            problems.append(f"{i}.{extra[0]}: unknown key; valid: {', '.join(SPEC_KEYS)}")
            continue
        if spec.get("options") is not None and not isinstance(spec["options"], dict):
            problems.append(f"{i}.options: expected a mapping (got {spec['options']!r})")
            continue
        try:
            attack = lookup(spec["name"])
            options = attack.resolve_options(spec.get("options"), where=f"{where}.{i}.options")
        except ValueError as exc:
            problems.append(f"{i}.name: {exc}")
            continue
        except ConfigError as exc:
            problems += [f"{i}.options.{p}" for p in exc.problems]
            continue
        out.append({"attack": attack, "observer": spec.get("observer"), "options": options})
    if problems:
        raise ConfigError(where, problems)
    return out


def captured_roles(run_path, protocol):
    """Every role that sent or received a captured message of ``protocol``."""
    roles = set()
    for rec in iter_jsonl(Path(run_path) / "capture" / "index.jsonl"):
        if rec.get("protocol") == protocol:
            roles.update((rec["src"], rec["dst"]))
    return roles


def run_attacks(run_path, attack_specs, write=True, progress=None):
    """Run, score and (with ``write``) save every spec; returns one result dict per
    (attack, observer), skipped ones included.  ``progress(line)``, when given, hears one
    line as each (attack, observer) starts and one as it ends."""
    run_path = Path(run_path)
    specs = parse_specs(attack_specs)
    protocol = yaml.safe_load((run_path / "scenario.yaml").read_text())["protocol"]["name"]
    roles = captured_roles(run_path, protocol)
    plan = []     # (spec, observer, base) to run, or a skipped result
    for spec in specs:
        attack, observer = spec["attack"], spec["observer"]
        base = {"attack": attack.name, "protocol": protocol, "threat_model": attack.threat_model.to_json(),
                "options": spec["options"]}
        if not attack.applies_to(protocol):
            note = f"{attack.name} does not target {protocol} (targets: {', '.join(attack.targets)})"
            plan.append({**base, "observer": observer or "-", "status": "skipped", "note": note})
            continue
        kinds = attack.kinds(protocol)
        chosen = [observer] if observer else obs.default_observers(protocol, kinds, roles)
        if not chosen:
            note = f"no observer in this run receives {', '.join(kinds)} (captured roles: " \
                   f"{', '.join(sorted(roles)) or 'none'})"
            plan.append({**base, "observer": "-", "status": "skipped", "note": note})
            continue
        for who in chosen:
            if not any(fnmatch.fnmatchcase(who, p) for p in attack.threat_model.observers):
                raise ConfigError("attacks", [f"{attack.name}.observer: {who!r} is outside its threat model "
                                              f"(observers: {', '.join(attack.threat_model.observers)})"])
            if who not in roles and who != WIRE:
                raise ConfigError("attacks", [f"{attack.name}.observer: {who!r} saw nothing in this run; "
                                              f"valid: {', '.join([WIRE] + sorted(roles))}"])
            plan.append((spec, who, base))
    scorer, results, t_all = None, [], time.perf_counter()
    n = sum(isinstance(p, tuple) for p in plan)
    done = 0
    for item in plan:
        if not isinstance(item, tuple):
            results.append(_finish(run_path, item, write))
            continue
        spec, who, base = item
        done += 1
        if progress:
            progress(f"[attacks {done}/{n}] {spec['attack'].name} as {who} ...")
        scorer = scorer or Scorer(run_path)
        result = run_one(run_path, spec["attack"], who, spec["options"], scorer, base)
        results.append(_finish(run_path, result, write))
        if progress:
            shared = result["scores"].get("shared_seconds")
            progress(f"[attacks {done}/{n}] {spec['attack'].name} as {who}: {_headline(result['scores'])} "
                     f"in {result['seconds']:.1f}s" + (f" (+{shared:.1f}s shared training)" if shared else ""))
    if progress and n:
        progress(f"[attacks] {n} attack runs in {time.perf_counter() - t_all:.1f}s")
    return results


def _headline(scores):
    for key, title in (("token_accuracy", "token accuracy"), ("token_set_recall", "set recall")):
        if isinstance(scores.get(key), float):
            return f"{title} {scores[key]:.3f}"
    return f"{scores.get('reconstructions', 0)} reconstructions"


def run_one(run_path, attack, observer, options, scorer, base=None):
    """One attack as one observer: view -> reconstructions -> scores (a result dict).

    ``seconds`` is this observer's own time; work the attack instance shares between its
    observers (an attacker model trained once) is ``scores.shared_seconds``, reported with
    the observer that paid for it."""
    view = AdversaryView(run_path, observer, knowledge=attack.threat_model.knowledge)
    shared0 = attack.shared_seconds
    t0 = time.perf_counter()
    recs = attack.run(view, **options)
    shared = attack.shared_seconds - shared0
    seconds = time.perf_counter() - t0 - shared
    summary, per_rec = scorer.score(recs)
    summary["seconds"] = seconds
    if shared:
        summary["shared_seconds"] = shared
    notes = sorted({r.meta["note"] for r in recs if r.meta.get("note")})
    log.info("%s as %s: %d reconstructions in %.2fs (+%.2fs shared)", attack.name, observer, len(recs),
             seconds, shared)
    return {**(base or {}), "observer": observer, "status": "ok", "seconds": seconds, "scores": summary,
            "notes": notes, "reconstructions": per_rec}


def _finish(run_path, result, write):
    if result["status"] == "skipped":
        log.info("attack %s skipped: %s", result["attack"], result["note"])
    if write:
        who = result["observer"]
        name = result["attack"] if who == "-" else f"{result['attack']}-{who}"
        out = run_path / "attacks" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out)
        result["path"] = str(out)
    return result


def format_table(results):
    """The attack x observer x metric table, as printed by ``python -m attacks run``."""
    head = ["attack", "observer"] + [title for _, title, _ in COLUMNS]
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["attack"], r["observer"], f"skipped: {r['note']}"])
            continue
        cells = []
        for key, _, fmt in COLUMNS:
            v = r["scores"].get(key)
            cells.append("-" if v is None else fmt.format(v))
        rows.append([r["attack"], r["observer"]] + cells)
    full = [head] + [r for r in rows if len(r) == len(head)]
    widths = [max(len(str(x[i])) for x in (full if i >= 2 else [head] + rows)) for i in range(len(head))]

    def line(cells):
        # names left-aligned, numbers right-aligned; a skipped row's note runs on unpadded
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) if len(cells) == len(head) else str(c)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [line(head)] + [line(row) for row in rows]
    return "\n".join(lines)
