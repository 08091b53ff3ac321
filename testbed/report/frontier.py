"""The privacy-utility frontier: attack success against held-out loss, one point per setting.

A sweep over a defence's strength (``python -m testbed sweep SCENARIO --grid
defences.0.sigma=0,0.01,0.1``) writes one run directory per setting.  The setting is
found in the runs' own ``scenario.yaml``, never in a side file: the *swept keys* are the
keys whose values differ between the runs (the scenario's ``name`` and ``seed`` aside;
runs over several seeds of one setting are averaged).  A run that lacks a swept key
(e.g. ``defences: []`` next to runs with a defence) is the "none" point, the weakest.

For each setting: the defended protocol's held-out loss (``summary.json``,
``mean_eval_loss``: the end of training, mean over parties), DP's ε where train records
carry one, and per attack the best observer's token recovery (token accuracy; token-set
recall for traffic without positions, e.g. PC-MoE expert messages) and canary recovery.
Points are joined in order of strength: larger is stronger for a noise scale, smaller for
top-k's ``fraction``, SanText's ``epsilon`` and secure aggregation's ``frac_bits``
(:data:`WEAKER_WHEN_LARGER`), and wire precision coarsens fp16 < bf16 < int8.
"""
import json
from dataclasses import dataclass, field

from .doc import Figure, Note, Section, Table, flatten, fmt_num

IGNORED = ("name", "seed", "seeds")
MAX_KEYS = 3                  # more keys differing: a comparison of scenarios, not a sweep
WEAKER_WHEN_LARGER = ("fraction", "epsilon", "frac_bits")
ORDERED = {"bits": ("fp16", "bf16", "int8")}       # wire precision, finest first
SYMBOLS = {"sigma": "σ", "noise_sigma": "σ", "noise_multiplier": "z", "epsilon": "ε_text"}
MISSING = object()


@dataclass
class Point:
    """One setting of the sweep: its runs and what they measured (means over the runs)."""

    setting: dict                  # swept key -> value (MISSING: the run lacks the key)
    label: str
    strength: tuple
    runs: list = field(default_factory=list)
    loss: float = None
    epsilon: float = None
    token: dict = field(default_factory=dict)     # attack -> token recovery (best observer)
    canary: dict = field(default_factory=dict)    # attack -> canary recovery (best observer)
    observer: dict = field(default_factory=dict)  # attack -> the observer that did best


def short_key(key):
    """'defences.0.sigma' -> 'sigma': the last part that is not an item number."""
    parts = [p for p in key.split(".") if not p.isdigit()]
    return parts[-1] if parts else key


def _canon(v):
    return json.dumps(v, sort_keys=True)


def swept_keys(runs):
    """Keys whose values differ between the runs' scenarios, in the scenario's order.  Keys
    that only some runs have, with one value where present (the fields of a defence that
    some runs lack), are left out when other keys vary; alone, the first of them is kept."""
    flat = [dict(flatten(r.scenario)) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f if k.split(".")[0] not in IGNORED))
    varying, presence = [], []
    for k in keys:
        present = {_canon(f[k]) for f in flat if k in f}
        if len(present) > 1:
            varying.append(k)
        elif any(k not in f for f in flat):
            presence.append(k)
    return varying or presence[:1]


def strength(key, value):
    """A sort key: stronger settings sort later; a missing key (no defence) first."""
    if value is MISSING or value is None:
        return (0, 0, 0)
    name = short_key(key)
    if name in ORDERED and value in ORDERED[name]:
        return (1, 0, ORDERED[name].index(value))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, 0, -value if name in WEAKER_WHEN_LARGER else value)
    return (1, 1, _canon(value))


def setting_label(setting):
    """{'defences.0.sigma': 0.1} -> 'σ=0.1'; a missing key reads 'none'."""
    parts = []
    for k, v in setting.items():
        name = short_key(k)
        shown = "none" if v is MISSING else fmt_num(v) if isinstance(v, (int, float)) else _canon(v).strip('"')
        parts.append(f"{SYMBOLS.get(name, name)}={shown}")
    return ", ".join(parts)


def _main_protocol(run):
    return ((run.scenario or {}).get("protocol") or {}).get("name")


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def run_loss(run, protocol):
    """The protocol's held-out loss at the end of training (summary.json), or None."""
    return (((run.summary or {}).get("protocols") or {}).get(protocol) or {}).get("mean_eval_loss")


def run_epsilon(run, protocol):
    """The largest ε any party had spent at the run's last accounted step, or None."""
    from .privacy import epsilon_series
    by_step, _ = epsilon_series(run, protocol)
    return by_step[max(by_step)] if by_step else None


def run_success(run, protocol):
    """attack -> (token recovery, canary recovery, observer): each attack's best observer on
    the protocol's traffic (the one that recovered most tokens)."""
    best = {}
    for res in run.attacks or []:
        if res.get("status", "ok") != "ok" or res.get("protocol", protocol) != protocol:
            continue
        sc = res.get("scores") or {}
        token = sc.get("token_accuracy", sc.get("token_set_recall"))
        row = (token, sc.get("canary_recovery"), res.get("observer", "?"))
        name = res.get("attack", "?")
        if name not in best or (token or 0.0) > (best[name][0] or 0.0):
            best[name] = row
    return best


def token_metric(runs, attack):
    """'tok acc' when the attack scored token accuracy in any run, else 'set recall'."""
    for r in runs:
        for res in r.attacks or []:
            if res.get("attack") == attack and "token_accuracy" in (res.get("scores") or {}):
                return "tok acc"
    return "set recall"


def frontier(runs):
    """-> (swept keys, protocol, [Point] weakest first), or None when the runs are not a
    sweep of one protocol (fewer than two runs, different protocols, no key or too many
    keys differing)."""
    runs = [r for r in runs if r.scenario]
    protocols = {_main_protocol(r) for r in runs}
    if len(runs) < 2 or len(protocols) != 1:
        return None
    keys = swept_keys(runs)
    if not keys or len(keys) > MAX_KEYS:
        return None
    protocol = protocols.pop()
    groups = {}
    for r in runs:
        flat = dict(flatten(r.scenario))
        setting = {k: flat.get(k, MISSING) for k in keys}
        sig = tuple("\0missing" if v is MISSING else _canon(v) for v in setting.values())
        groups.setdefault(sig, Point(setting, setting_label(setting),
                                     tuple(strength(k, v) for k, v in setting.items()))).runs.append(r)
    points = sorted(groups.values(), key=lambda p: p.strength)
    for p in points:
        p.loss = _mean([run_loss(r, protocol) for r in p.runs])
        p.epsilon = _mean([run_epsilon(r, protocol) for r in p.runs])
        per_run = [run_success(r, protocol) for r in p.runs]
        for attack in dict.fromkeys(a for s in per_run for a in s):
            rows = [s[attack] for s in per_run if attack in s]
            p.token[attack] = _mean([t for t, _, _ in rows])
            p.canary[attack] = _mean([c for _, c, _ in rows])
            p.observer[attack] = ", ".join(dict.fromkeys(o for _, _, o in rows))
    return keys, protocol, points


def _lines(keys, points):
    """Points grouped into the lines they are joined by: along the last swept key, one line
    per value of the others (one line for a single key)."""
    lines = {}
    for p in points:
        rest = {k: v for k, v in p.setting.items() if k != keys[-1]}
        lines.setdefault(setting_label(rest) if rest else "", []).append(p)
    return lines


def baseline_losses(runs):
    """protocol -> mean held-out loss over the runs, for the baselines (not the swept protocol)."""
    out = {}
    for r in runs:
        for name in (r.scenario or {}).get("baselines") or []:
            out.setdefault(name, []).append(run_loss(r, name))
    return {k: m for k, v in out.items() if (m := _mean(v)) is not None}


def frontier_section(ctx):
    """The frontier plot and table, or None when the runs are not a sweep."""
    found = frontier(ctx.runs)
    if found is None:
        return None
    keys, protocol, points = found
    attacks = list(dict.fromkeys(a for p in points for a in p.token))
    sec = Section("Privacy–utility frontier")
    sec.add(f"{len(points)} settings of {', '.join(f'`{k}`' for k in keys)} on {protocol} (the keys whose "
            "values differ between the runs' scenarios), weakest first.")
    if not attacks:
        sec.add(Note("no attack results in these runs: add attacks to the scenario (attacks:) to place "
                     "the settings on the frontier"))
    else:
        from .frontier_plot import frontier_plot
        metrics = {a: token_metric(ctx.runs, a) for a in attacks}
        lines = _lines(keys, points)
        series = [(f"{a} ({metrics[a]})" + (f" · {name}" if name else ""),
                   [(p.loss, p.token.get(a), p.canary.get(a), p.label, p.epsilon) for p in pts])
                  for a in attacks for name, pts in lines.items()]
        sec.add(Figure(frontier_plot(series, baseline_losses(ctx.runs), ctx.png("frontier.png"),
                                     f"{protocol}: attack success against held-out loss"),
                       "Each point is one setting (label: the swept value; ε where DP accounted it), "
                       "joined in order of strength. Left: tokens recovered (per position; set "
                       "recall where the traffic carries no positions); right: planted canaries "
                       "recovered. Each attack's best observer. Lower-left is better: less leaked "
                       "for the loss paid. Dashed lines: the baselines' held-out loss."))
    eps = any(p.epsilon is not None for p in points)
    n = any(len(p.runs) > 1 for p in points)
    head = ["setting"] + (["ε"] if eps else []) + ["held-out loss"] + \
        [c for a in attacks for c in (f"{a} {token_metric(ctx.runs, a)}", f"{a} canary")] + (["runs"] if n else [])
    rows = [[p.label] + ([fmt_num(p.epsilon, 3)] if eps else []) + [fmt_num(p.loss)] +
            [c for a in attacks for c in (fmt_num(p.token.get(a), 3), fmt_num(p.canary.get(a), 3))] +
            ([str(len(p.runs))] if n else []) for p in points]
    sec.add(Table(head, rows, caption="One row per setting, weakest first: held-out loss of the defended "
                  "protocol at the end of training, and per attack its best observer's token recovery and "
                  "canary recovery" + (" (means over the runs of a setting)" if n else "") + "."))
    return sec
