"""The one-screen summary of a run: final losses, memory, bytes, simulated time."""
from testbed.errors import fmt_bytes
from testbed.rundir import read_metrics


def summarize(scenario, run_path, results):
    """Build the summary dict from the run's metrics and each protocol's engine stats."""
    metrics = read_metrics(run_path)
    out = {"run": str(run_path), "scenario": scenario.name, "protocols": {}}
    for name, stats in results.items():
        evals, trains = {}, {}
        for r in metrics:
            if r.get("protocol") != name:
                continue
            if r.get("event") == "eval":
                evals[r["party"]] = r["eval_loss"]
            elif r.get("event") == "train":
                trains[r["party"]] = r["loss"]
        mem = stats["memory"]
        out["protocols"][name] = {
            "eval_loss": evals,
            "mean_eval_loss": sum(evals.values()) / len(evals) if evals else None,
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


def format_summary(summary):
    """Plain-text table for the terminal."""
    lines = [f"run: {summary['run']}", "",
             f"{'protocol':<14}{'mean eval loss':>15}{'vs central':>12}{'max peak mem':>15}"
             f"{'mem saved':>11}{'wire bytes':>14}{'messages':>10}{'sim time':>12}"]
    for name, p in summary["protocols"].items():
        ev = f"{p['mean_eval_loss']:.4f}" if p["mean_eval_loss"] is not None else "-"
        vs = f"{p['eval_loss_vs_centralized']:+.1%}" if "eval_loss_vs_centralized" in p else "-"
        ms = f"{p['memory_reduction_vs_centralized']:.1%}" if "memory_reduction_vs_centralized" in p else "-"
        lines.append(f"{name:<14}{ev:>15}{vs:>12}{fmt_bytes(p['max_party_peak']):>15}{ms:>11}"
                     f"{fmt_bytes(p['bytes']):>14}{p['messages']:>10}{p['sim_time']:>11.2f}s")
    lines.append("")
    lines.append("peak memory per role (params / grads / optimizer / activations):")
    for name, p in summary["protocols"].items():
        for role, m in p["memory"].items():
            lines.append(f"  {name:<12} {role:<12} {fmt_bytes(m['peak']):>11}  = "
                         f"{fmt_bytes(m['params'])} / {fmt_bytes(m['grads'])} / "
                         f"{fmt_bytes(m['optimizer'])} / {fmt_bytes(m['activations'])}")
    return "\n".join(lines)
