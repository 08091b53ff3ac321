"""Report sections on privacy: the attack x protocol x metric matrix, and DP epsilon.

Scores are shown per metric family -- sequence (per position), canaries, token sets --
each on its own scale (:data:`FAMILIES`).

The matrix is built from whatever ``attacks/*.json`` the runs hold (written by
``python -m attacks run`` or by a scenario's ``attacks:`` list); nothing here knows an
attack by name.  A score is any float in [0, 1] under a result's ``scores`` (counts
such as ``rows`` are ints, timings are excluded by name), so a new attack's metrics
appear as new columns.
"""
from collections import defaultdict

from . import plots
from .doc import Figure, Note, Section, Table, fmt_num, split_columns

NOT_SCORES = {"seconds", "shared_seconds"}


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


# Metric families, each on its own scale (panel and table columns), in this order.
FAMILIES = [
    ("sequence", "sequence (per position)",
     [("token_accuracy", "tok acc"), ("rouge1", "R-1"), ("rouge2", "R-2"), ("rougeL", "R-L"),
      ("exact_match", "exact"), ("routed_accuracy", "routed")]),
    ("canary", "canaries", [("canary_recovery", "canary")]),
    ("set", "token sets", [("token_set_recall", "set rec"), ("token_set_precision", "set prec"),
                          ("token_set_exact", "set exact")]),
]


WHO = ["protocol", "attack", "observer"]
FAMILY_NOTES = {
    "sequence": "tok acc, ROUGE-1/2/L and exact match position by position; routed: accuracy over "
                "the positions the observer received.",
    "canary": "planted secrets recovered / present in the attacked rows.",
    "set": "token-set recall, precision and equality (order ignored).",
    "other": "scores of attacks this report has no family for.",
}


def families(metrics):
    """Split score names into [(family, title, [(key, short name)])]; unknown scores go to
    an ``other`` family; families with no measured metric are dropped."""
    known = {k for _, _, cols in FAMILIES for k, _ in cols}
    out = [(f, t, [(k, n) for k, n in cols if k in metrics]) for f, t, cols in FAMILIES]
    other = [(k, k) for k in metrics if k not in known]
    if other:
        out.append(("other", "other scores", other))
    return [x for x in out if x[2]]


def _canary_cell(sc):
    present = sc.get("canaries_present")
    if not present:
        return "-"
    found = sum(1 for c in sc.get("canary_rows") or [] if c.get("recovered"))
    return f"{found}/{present}"


def _who(ctx, run, res):
    return [ctx.label(run, res.get("protocol", "?")), res.get("attack", "?"), res.get("observer", "?")]


def score_tables(ctx, rows, values, fams, col):
    """One table per metric family (only the attacks that measured something in it), then
    one of details (rows attacked, seconds): no table is wider than its family."""
    out = []
    who = [_who(ctx, run, res) for run, res in rows]
    for f, title, cols in fams:
        body = []
        for (run, res), ident, vals in zip(rows, who, values):
            fam = [vals[col[k]] for k, _ in cols]
            if all(v is None for v in fam):
                continue
            cells = [_canary_cell(res.get("scores") or {})] if f == "canary" else [fmt_num(v) for v in fam]
            body.append(ident + cells)
        if body:
            out += split_columns(Table(WHO + [n for _, n in cols], body,
                                       caption=f"Scores, {title}: {FAMILY_NOTES[f]}"), keys=len(WHO))
    details = [ident + [fmt_num((res.get("scores") or {}).get("rows")), fmt_num(res.get("seconds"))]
               for (run, res), ident in zip(rows, who)]
    out.append(Table(WHO + ["rows attacked", "seconds"], details,
                     caption="Every attack that ran: the rows of private data it attacked and its run "
                             "time. An attack missing from a score table measured nothing in that family."))
    return out


def _per_attack(ctx, rows, key):
    """(protocol · attack) -> [every observer's ``scores[key]`` mapping] (by_layer, by_step)."""
    out = {}
    for run, res in rows:
        value = (res.get("scores") or {}).get(key)
        if isinstance(value, dict) and value:
            out.setdefault(f"{ctx.label(run, res.get('protocol', '?'))} · {res['attack']}", []).append(value)
    return out


def note_rows(ctx, rows):
    """[[note, the attacks it applies to]]: each distinct note once, in order of first
    appearance; "applies to" groups the observers per (protocol, attack)."""
    where = {}
    for run, res in rows:
        for n in res.get("notes") or []:
            protocol, attack, observer = _who(ctx, run, res)
            where.setdefault(n, {}).setdefault(f"{protocol} · {attack}", []).append(observer)
    return [[n, "; ".join(f"{k} ({', '.join(dict.fromkeys(obs))})" for k, obs in groups.items())]
            for n, groups in where.items()]


def attacks_section(ctx):
    """Score panels (one scale per metric family) and a compact table of every attack,
    skipped attacks, threat models, "not run"."""
    from . import privacy_plots
    sec = Section("Privacy: attacks")
    rows, metrics, values, skipped, not_run = attack_matrix(ctx.runs)
    for run, why in not_run:
        sec.add(Note(f"{run.label}: attacks not run ({why})"))
    _exposure(ctx, sec)
    if not rows and not skipped:
        return sec
    if rows:
        fams = families(metrics)
        col = {m: j for j, m in enumerate(metrics)}
        labels = [f"{ctx.label(run, res.get('protocol', '?'))} · {res['attack']} ({res.get('observer', '?')})"
                  for run, res in rows]
        if fams:
            panels = [(f, t, [n for _, n in cols], [[vals[col[k]] for k, _ in cols] for vals in values])
                      for f, t, cols in fams]
            sec.add(Figure(privacy_plots.score_panels(labels, panels, ctx.png("attacks.png"),
                                                      "Attack × protocol, one scale per metric family"),
                           "Each row is one attack as one observer on one protocol's captured traffic, "
                           "scored against the private data (1 = fully recovered). Sequence metrics "
                           "compare position by position; canary recovery counts planted secrets in "
                           "attacked rows; token-set metrics ignore order and are not comparable to "
                           "the sequence metrics."))
        sec.add(*score_tables(ctx, rows, values, fams, col))
        layered = _per_attack(ctx, rows, "by_layer")    # (protocol, attack) -> every observer's by_layer
        if layered:
            sec.add(Figure(privacy_plots.layer_plot(list(layered.items()), ctx.png("attacks_by_layer.png")),
                           "Per-position success by layer, one colour per attack: the mean over its "
                           "observers (shaded: their min–max). Solid: token accuracy over every position "
                           "of the attacked batches (positions the observer never received count as "
                           "wrong); dashed: accuracy over the rows it received."))
        stepped = _per_attack(ctx, rows, "by_step")
        if stepped:
            sec.add(Figure(privacy_plots.layer_plot(list(stepped.items()), ctx.png("attacks_by_step.png"),
                                                    "training step of the attacked batch",
                                                    "Leakage over training (per position)"),
                           "Per-position success against the training step the attacked batch was sent "
                           "at, one colour per attack: the mean over its observers (shaded: their "
                           "min–max); dashed, where the observer receives rows: accuracy on those rows. "
                           "Attacks that read the starting checkpoint weaken as the models drift from it."))
        notes = note_rows(ctx, rows)
        if notes:
            sec.add(Table(["note", "applies to"], notes,
                          caption="Notes the attacks reported, each once, with the attacks it applies to."))
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


def _exposure(ctx, sec):
    """Canary exposure (attacks/exposure.json, ``python -m attacks exposure``): a figure and
    a table per run that has it."""
    import json

    from . import privacy_plots
    for run in ctx.runs:
        f = run.path / "attacks" / "exposure.json"
        if not f.is_file():
            continue
        try:
            out = json.loads(f.read_text())
            ids = [c["id"] for c in out["canaries"]]
            trained = {c["id"]: c.get("trained") for c in out["canaries"]}
            series = [(m["model"], m["exposure"]) for m in out["models"]]
        except (ValueError, KeyError, TypeError) as exc:
            sec.add(Note(f"{run.label}: attacks/exposure.json unreadable ({exc})"))
            continue
        name = f"exposure-{run.label}.png" if len(ctx.runs) > 1 else "exposure.png"
        sec.add(Figure(privacy_plots.exposure_plot(series, ctx.png(name), out["max_bits"]),
                       f"{run.label}: exposure of each canary (bits; {out['candidates']} random "
                       "candidates of its format) under the models observers hold, against the "
                       "starting checkpoint that never saw it."),
                Table(["model", "held by"] + [f"{i}{'' if trained[i] else ' (not trained on)'}" for i in ids],
                      [[m["model"], m["held_by"]] + [f"{m['exposure'][i]:.2f} (rank {m['rank'][i]})"
                                                     for i in ids] for m in out["models"]],
                      caption=f"{run.label}: canary exposure, max {out['max_bits']:.2f} bits."))


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
