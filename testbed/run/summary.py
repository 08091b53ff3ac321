"""The one-screen summary of a run: final and best losses, memory, bytes, simulated time.

``mean_eval_loss`` is the held-out loss at the end of training (mean over parties);
``best_eval_loss`` is the same for the best checkpoint each model saw: every role that
evaluates (one model) picks the eval step where its mean over the parties it evaluates
is lowest, so a baseline is never judged only by an overfitted last checkpoint.
Summaries over seeds (mean ± 95% CI) are :mod:`testbed.run.seeds`.
"""
from collections import defaultdict

from testbed.errors import fmt_bytes
from testbed.rundir import read_metrics


def best_eval_loss(evals):
    """``evals``: eval records of one protocol -> mean over parties of the loss at each
    model's (role's) best eval step (steps < 0, the untrained start, excluded)."""
    by_role = defaultdict(lambda: defaultdict(dict))     # role -> step -> party -> loss
    for r in evals:
        if r.get("step", 0) >= 0:
            by_role[r.get("role", r["party"])][r["step"]][r["party"]] = r["eval_loss"]
    chosen = []
    for steps in by_role.values():
        best = min(steps.values(), key=lambda d: sum(d.values()) / len(d))
        chosen += list(best.values())
    return sum(chosen) / len(chosen) if chosen else None


def summarize(scenario, run_path, results):
    """Build the summary dict from the run's metrics and each protocol's engine stats."""
    metrics = read_metrics(run_path)
    out = {"run": str(run_path), "scenario": scenario.name, "protocols": {}}
    for name, stats in results.items():
        evals, trains, eval_recs = {}, {}, []
        for r in metrics:
            if r.get("protocol") != name:
                continue
            if r.get("event") == "eval":
                evals[r["party"]] = r["eval_loss"]
                eval_recs.append(r)
            elif r.get("event") == "train":
                trains[r["party"]] = r["loss"]
        mem = stats["memory"]
        out["protocols"][name] = {
            "eval_loss": evals,
            "mean_eval_loss": sum(evals.values()) / len(evals) if evals else None,
            "best_eval_loss": best_eval_loss(eval_recs),
            "train_tokens": _tokens(metrics, name),
            "final_train_loss": trains,
            "sim_time": stats["sim_time"], "bytes": stats["bytes"], "messages": stats["messages"],
            "peak_memory": {r: m["peak"] for r, m in mem.items()},
            "memory": mem,
            # the largest party's peak; protocols with no party roles (centralized) use all roles
            "max_party_peak": max((m["peak"] for r, m in mem.items() if r.startswith("party-")),
                                  default=max((m["peak"] for m in mem.values()), default=0)),
        }
    protos = out["protocols"]
    if "centralized" in protos:
        central = protos["centralized"]
        for name, p in protos.items():
            if name == "centralized":
                continue
            if p["mean_eval_loss"] is not None and central["mean_eval_loss"]:
                p["eval_loss_vs_centralized"] = p["mean_eval_loss"] / central["mean_eval_loss"] - 1
            party_peaks = [m["peak"] for r, m in p["memory"].items() if r.startswith("party-")]
            if party_peaks and central["max_party_peak"]:
                p["memory_reduction_vs_centralized"] = 1 - max(party_peaks) / central["max_party_peak"]
    return out


def _tokens(metrics, name):
    """Training tokens per party of protocol ``name`` (from its train records)."""
    out = defaultdict(int)
    for r in metrics:
        if r.get("protocol") == name and r.get("event") == "train":
            out[r["party"]] += int(r.get("tokens") or 0)
    return dict(out)


def format_summary(summary):
    """Plain-text table for the terminal."""
    lines = [f"run: {summary['run']}", "",
             f"{'protocol':<22}{'mean eval loss':>16}{'best':>9}{'vs central':>12}{'max peak mem':>15}"
             f"{'mem saved':>11}{'wire bytes':>14}{'messages':>10}{'sim time':>12}"]
    for name, p in summary["protocols"].items():
        ev = f"{p['mean_eval_loss']:.4f}" if p["mean_eval_loss"] is not None else "-"
        vs = f"{p['eval_loss_vs_centralized']:+.1%}" if "eval_loss_vs_centralized" in p else "-"
        ms = f"{p['memory_reduction_vs_centralized']:.1%}" if "memory_reduction_vs_centralized" in p else "-"
        best = f"{p['best_eval_loss']:.4f}" if p.get("best_eval_loss") is not None else "-"
        lines.append(f"{name:<22}{ev:>16}{best:>9}{vs:>12}{fmt_bytes(p['max_party_peak']):>15}{ms:>11}"
                     f"{fmt_bytes(p['bytes']):>14}{p['messages']:>10}{p['sim_time']:>11.2f}s")
    lines.append("")
    lines.append("peak memory per role (params / grads / optimizer / activations):")
    for name, p in summary["protocols"].items():
        for role, m in p["memory"].items():
            lines.append(f"  {name:<12} {role:<12} {fmt_bytes(m['peak']):>11}  = "
                         f"{fmt_bytes(m['params'])} / {fmt_bytes(m['grads'])} / "
                         f"{fmt_bytes(m['optimizer'])} / {fmt_bytes(m['activations'])}")
    return "\n".join(lines)
