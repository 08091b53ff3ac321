"""Report sections on privacy: the attack x protocol x metric matrix, and DP epsilon.

The matrix is built from whatever ``attacks/*.json`` the runs hold (written by
``python -m attacks run`` or by a scenario's ``attacks:`` list); nothing here knows an
attack by name.  A score is any float in [0, 1] under a result's ``scores`` (counts
such as ``rows`` are ints, timings are excluded by name), so a new attack's metrics
appear as new columns.
"""
from collections import defaultdict

from . import plots
from .doc import Figure, Note, Section, Table, fmt_num

NOT_SCORES = {"seconds"}


def _is_score(key, value):
    return key not in NOT_SCORES and isinstance(value, float) and 0.0 <= value <= 1.0


def attack_matrix(runs):
    """-> (rows, metrics, values, skipped, not_run).

    ``rows``: [(run, result)] of the attacks that ran; ``metrics``: score names in order of
    first appearance; ``values[i][j]``: float or None; ``skipped``: [(run, result)];
    ``not_run``: [(run, reason)]."""
    rows, skipped, not_run, metrics = [], [], [], {}
    for run in runs:
        if run.attacks is None:
            not_run.append((run, "no attacks directory"))
            continue
        if not run.attacks:
            not_run.append((run, "attacks directory is empty"))
            continue
        for res in run.attacks:
            if res.get("status", "ok") != "ok":
                skipped.append((run, res))
                continue
            rows.append((run, res))
            for k, v in (res.get("scores") or {}).items():
                if _is_score(k, v):
                    metrics.setdefault(k, None)
    metrics = list(metrics)
    values = [[(res.get("scores") or {}).get(m) if _is_score(m, (res.get("scores") or {}).get(m))
               else None for m in metrics] for _, res in rows]
    return rows, metrics, values, skipped, not_run


def attacks_section(ctx):
    """Heatmap and table of every attack score, skipped attacks, threat models, "not run"."""
    sec = Section("Privacy: attacks")
    rows, metrics, values, skipped, not_run = attack_matrix(ctx.runs)
    for run, why in not_run:
        sec.add(Note(f"{run.label}: attacks not run ({why})"))
    if not rows and not skipped:
        return sec
    if rows:
        labels = [f"{ctx.label(run, res.get('protocol', '?'))} · {res['attack']} ({res.get('observer', '?')})"
                  for run, res in rows]
        if metrics:
            sec.add(Figure(plots.heatmap(labels, metrics, values, ctx.png("attacks.png"),
                                         "Attack × protocol × metric"),
                           "Each row is one attack as one observer on one protocol's captured "
                           "traffic, scored against the private data (1 = fully recovered)."))
        table = []
        for (run, res), vals in zip(rows, values):
            sc = res.get("scores") or {}
            table.append([ctx.label(run, res.get("protocol", "?")), res["attack"], res.get("observer", "?")]
                         + [fmt_num(v) for v in vals]
                         + [fmt_num(sc.get("batches")), fmt_num(sc.get("rows")), fmt_num(res.get("seconds"))])
        sec.add(Table(["protocol", "attack", "observer"] + metrics + ["batches", "rows", "seconds"], table,
                      caption="Scores per attack and observer (from attacks/*.json)."))
        notes = [[ctx.label(run, res.get("protocol", "?")), res["attack"], n]
                 for run, res in rows for n in res.get("notes") or []]
        if notes:
            sec.add(Table(["protocol", "attack", "note"], notes, caption="Notes the attacks reported."))
    if skipped:
        sec.add(Table(["protocol", "attack", "status", "why"],
                      [[ctx.label(run, res.get("protocol", "?")), res.get("attack", "?"),
                        res.get("status", "?"), res.get("note") or res.get("error") or "-"]
                       for run, res in skipped], caption="Attacks that did not run."))
    models = {}
    for _, res in rows + skipped:
        tm = res.get("threat_model") or {}
        models.setdefault(res.get("attack", "?"), [", ".join(tm.get("observers") or []) or "-",
                                                   ", ".join(tm.get("knowledge") or []) or "-",
                                                   tm.get("summary") or "-"])
    sec.add(Table(["attack", "observers", "knowledge", "threat model"],
                  [[name] + cells for name, cells in models.items()], caption="Threat models."))
    return sec


def epsilon_series(run, protocol):
    """step -> largest epsilon any party had spent by then; and party -> its last record."""
    by_step, last = defaultdict(float), {}
    for r in run.events("train", protocol):
        eps = r.get("epsilon")
        if eps is None or "step" not in r:
            continue
        by_step[r["step"]] = max(by_step[r["step"]], float(eps))
        last[r.get("party", "?")] = r
    return dict(by_step), last


def dp_section(ctx):
    """DP epsilon over steps, where train records carry ``epsilon``."""
    sec = Section("Privacy: differential privacy")
    series, table = [], []
    for run, p in ctx.pairs():
        by_step, last = epsilon_series(run, p)
        if not by_step:
            continue
        series.append((ctx.label(run, p), ctx.color(run, p), list(by_step.items())))
        table += [[ctx.label(run, p), party, fmt_num(r.get("epsilon")), fmt_num(r.get("delta")),
                   fmt_num(r.get("noise_multiplier")), fmt_num(r.get("max_grad_norm")), fmt_num(r.get("step"))]
                  for party, r in sorted(last.items())]
    if not series:
        return sec.add(Note("no DP accounting in these runs (no train record carries epsilon)"))
    sec.add(Figure(plots.epsilon_plot(series, ctx.png("epsilon.png")),
                   "Privacy spent per protocol: the largest ε of any party at each step."),
            Table(["protocol", "party", "ε", "δ", "noise multiplier", "max grad norm", "at step"], table))
    return sec
