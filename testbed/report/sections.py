"""Report sections on learning and cost: overview, loss curves, memory, communication.

Each ``*_section(ctx)`` returns a :class:`~testbed.report.doc.Section`, writing its
PNGs into ``ctx.out_dir``.  Privacy sections are in :mod:`testbed.report.privacy`,
scenario and protocol-specific ones in :mod:`testbed.report.extras`.
"""
from . import plots
from .caveats import loss_caveats
from .doc import Figure, Note, Section, Table, fmt_num, fmt_size, fmt_time
from .series import engine, final_eval, is_party, last_train_losses, learning_series, memory, overview_row

# Past this many party roles in one protocol, plots show the largest party only.
MAX_PARTY_BARS = 8
MAX_LINK_BARS = 16


def _pct(v):
    return "-" if v is None else f"{v:+.1%}"


def overview_section(ctx):
    """Which runs, their status, and one results row per protocol."""
    sec = Section("Overview")
    rows = []
    for r in ctx.runs:
        sc, man = r.scenario or {}, r.manifest
        rows.append([r.label, str(r.path), sc.get("name", "-"), ", ".join(r.protocols) or "-",
                     fmt_num((sc.get("parties") or {}).get("count")),
                     fmt_num((sc.get("training") or {}).get("steps")),
                     man.get("status", "unknown"), man.get("mode", "-"), fmt_time(man.get("start"))])
        if man.get("status") == "failed":
            sec.add(Note(f"run {r.label} failed: {man.get('error') or 'no error recorded'} "
                         "(the report shows what it wrote before failing)"))
    sec.add(Table(["run", "directory", "scenario", "protocols", "parties", "steps", "status", "mode",
                   "started"], rows))
    res = []
    for run, p in ctx.pairs():
        o = overview_row(run, p)
        res.append([ctx.label(run, p), fmt_num(o["mean_eval_loss"]), _pct(o["vs_central"]),
                    fmt_size(o["max_party_peak"]), _pct(o["mem_vs_central"]),
                    fmt_size(o["bytes"]), fmt_num(o["messages"]),
                    "-" if o["sim_time"] is None else f"{o['sim_time']:.2f} s"])
    sec.add(*[Note(c) for c in loss_caveats(ctx.runs)])
    sec.add(Table(["protocol", "mean eval loss", "vs centralized", "max party peak memory",
                   "memory vs centralized", "wire bytes", "messages", "simulated time"], res,
                  caption="Final held-out loss (mean over parties), largest party's peak memory, "
                          "traffic and simulated wall time; comparisons are to the same run's "
                          "centralized protocol."))
    return sec


BAND = ("Lines: mean over parties; shaded (train) and error bars (eval): min–max over parties. "
        "Train curves are interpolated between each party's own points, so parties that train in "
        "turn or on their own clocks are compared at the same {x}.")


def learning_section(ctx):
    """Loss vs step and vs simulated time: per protocol one train and one eval curve (the
    mean over parties) with the parties' min-max as a band."""
    sec = Section("Learning")
    sec.add(*[Note(c) for c in loss_caveats(ctx.runs)])
    by_step = learning_series(ctx, "step")
    if not any(train or evals for _, _, train, evals in by_step):
        return sec.add(Note("no train or eval records in metrics.jsonl"))
    sec.add(Figure(plots.loss_plot(by_step, ctx.png("loss_vs_step.png"), "step",
                                   "Loss vs step (solid: train, dashed: eval)"),
                   "Train loss and held-out loss per eval. " + BAND.format(x="step")))
    by_time = learning_series(ctx, "sim_time")
    if any(x for _, _, train, evals in by_time for x, *_ in train + evals):
        sec.add(Figure(plots.loss_plot(by_time, ctx.png("loss_vs_time.png"), "simulated time (s)",
                                       "Loss vs simulated wall time"),
                       "Against simulated time (network and devices as modelled). "
                       + BAND.format(x="time") + " An eval point sits at the parties' mean time "
                       "of that evaluation."))
    else:
        sec.add(Note("simulated time stayed 0 (compute.mode: none and no traffic): no time axis to plot"))
    rows = []
    for run, p in ctx.pairs():
        last, finals = last_train_losses(run, p), final_eval(run, p)
        rows.append([ctx.label(run, p),
                     fmt_num(sum(v for _, v in last.values()) / len(last) if last else None),
                     fmt_num(max(s for s, _ in last.values()) if last else None),
                     ", ".join(f"{k}: {fmt_num(v)}" for k, v in sorted(finals.items())) or "-"])
    sec.add(Table(["protocol", "final train loss", "at step", "final eval loss per party"], rows,
                  caption="Final train loss: the mean over parties of each party's last train loss "
                          "(PC-MoE parties take turns, so their last steps differ); at step: the last."))
    return sec


def _memory_roles(mem):
    """Roles to draw: all of them, or (many parties) the largest party plus non-parties."""
    parties = [r for r in mem if is_party(r)]
    if len(parties) <= MAX_PARTY_BARS:
        return list(mem), None
    top = max(parties, key=lambda r: mem[r].get("peak") or 0)
    return [top] + [r for r in mem if not is_party(r)], f"{len(parties)} parties; drawing the largest ({top})"


def memory_section(ctx):
    """Peak memory per role, stacked by kind, centralized alongside."""
    sec = Section("Memory")
    bars, rows, notes = [], [], []
    for run, p in ctx.pairs():
        mem = memory(run, p)
        roles, note = _memory_roles(mem)
        if note:
            notes.append(f"{ctx.label(run, p)}: {note}")
        for role in roles:
            m = mem[role]
            bars.append((f"{ctx.label(run, p)}\n{role}", m, m.get("budget")))
        for role, m in mem.items():
            rows.append([ctx.label(run, p), role] + [fmt_size(m.get(k)) for k in plots.MEMORY_PARTS]
                        + [fmt_size(m.get("peak")), fmt_size(m.get("budget"))])
    if not bars:
        return sec.add(Note("no memory records in metrics.jsonl"))
    if not any(p == "centralized" for _, p in ctx.pairs()):
        notes.append("no centralized protocol in these runs to compare with")
    sec.add(Figure(plots.memory_plot(bars, ctx.png("memory.png")),
                   "Peak accelerator memory per role, split into parameters, gradients, optimizer "
                   "state and activations at the peak."),
            *[Note(n) for n in notes],
            Table(["protocol", "role"] + list(plots.MEMORY_PARTS) + ["peak", "budget"], rows))
    return sec


def communication_section(ctx):
    """Bytes per link (engine records) and per step (capture index)."""
    sec = Section("Communication")
    links, steps, kinds, pairs = [], [], [], []
    for run, p in ctx.pairs():
        label = ctx.label(run, p)
        for role, io in (engine(run, p).get("links") or {}).items():
            up, down = io.get("bytes_up") or 0, io.get("bytes_down") or 0
            if up or down:
                links.append((f"{label}\n{role}", up, down))
        t = run.traffic.get(p)
        if t is None or not t.messages:
            continue
        steps.append((label, ctx.color(run, p), list(t.by_step.items())))
        kinds += [[label, k, fmt_num(n), fmt_size(b)] for k, (n, b) in
                  sorted(t.by_kind.items(), key=lambda kv: -kv[1][1])]
        pairs += [[label, f"{s} → {d}", fmt_num(n), fmt_size(b)] for (s, d), (n, b) in
                  sorted(t.by_link.items(), key=lambda kv: -kv[1][1])[:MAX_LINK_BARS]]
    if not links and not steps:
        return sec.add(Note("no bytes on any link: these protocols do not communicate "
                            "(e.g. local, centralized)"))
    if links:
        if len(links) > MAX_LINK_BARS:
            sec.add(Note(f"{len(links)} links; drawing the {MAX_LINK_BARS} busiest"))
            links = sorted(links, key=lambda x: -(x[1] + x[2]))[:MAX_LINK_BARS]
        sec.add(Figure(plots.link_bytes_plot(links, ctx.png("bytes_per_link.png")),
                       "Bytes each role sent (up) and received (down) on its link, from the "
                       "engine's link counters."))
    if steps:
        sec.add(Figure(plots.step_bytes_plot(steps, ctx.png("bytes_per_step.png")),
                       "Bytes of every captured message, summed per training step."),
                Table(["protocol", "message kind", "messages", "bytes"], kinds,
                      caption="Captured traffic by message kind."),
                Table(["protocol", "src → dst", "messages", "bytes"], pairs,
                      caption="Busiest sender → receiver pairs in the capture."))
    else:
        sec.add(Note("no capture index (capture disabled or nothing sent)"))
    return sec
