"""PrivateLoRA serving under two sets of assumptions, and the latency where it pays off.

Built on :mod:`testbed.costs.throughput` (one pass's FLOPs, bytes and messages):

* :func:`compare` -- every scheme in the ``realistic`` model (the embedded engine's
  assumptions: link latency and jitter, codec framing, the embedding upload and the final
  hidden-state download) and in ``paper`` mode, the accounting of the PrivateLoRA paper
  (Wang et al. 2023, https://arxiv.org/abs/2311.14030): a bandwidth-only link (no latency,
  no jitter), tensor payload only, and per token only the per-layer A·x down and M·A·x up;
* :func:`break_even_rtt` -- the device<->cloud round-trip time below which PrivateLoRA's
  decode beats the device-only baseline: a decode pass is ``T0 + (messages / 2) * RTT``
  (``T0``: compute and serialization, ``messages / 2`` sequential round trips), so it wins
  while ``RTT < (T_device_only - T0) / (messages / 2)``;
* :func:`rank_sweep` -- decode throughput and bytes per token as the rank of one
  direction (``c2d``: A·x, ``d2c``: M·A·x) or both varies, the other held.
"""
from .throughput import PARTY, CLOUD, evaluate, pass_cost, pass_seconds

MODES = ("realistic", "paper")


def paper_kwargs(kw):
    """The paper's accounting: payload only, no embedding upload or final-hidden download."""
    return {**kw, "framing": False, "ends": False}


def compare(s, setup, **kw):
    """{"realistic": evaluate(...), "paper": evaluate(...)} for the same shapes and profiles."""
    return {"realistic": evaluate(s, setup, **kw),
            "paper": evaluate(s, setup.without_latency(), **paper_kwargs(kw))}


def break_even_rtt(s, setup, prompt_len=512, **kw):
    """The round-trip time below which PrivateLoRA decodes faster than device-only.

    Returns seconds (``rtt_s``; None when PrivateLoRA loses even with no latency), the
    deployment's own RTT, the decode pass times it is computed from, and the round trips
    per pass."""
    flat = setup.without_latency()
    t_dev = pass_seconds(pass_cost(s, "device_only", 1, prompt_len + 1, start=prompt_len, **kw),
                         flat)["total"]
    cost = pass_cost(s, "privatelora", 1, prompt_len + 1, start=prompt_len, **kw)
    t0 = pass_seconds(cost, flat)["total"]
    trips = len(cost.messages) / 2
    rtt = (t_dev - t0) / trips if t_dev > t0 else None
    return {"rtt_s": rtt, "current_rtt_s": setup.rtt_seconds(), "round_trips_per_token": trips,
            "device_only_pass_s": t_dev, "privatelora_pass_no_latency_s": t0,
            "wins_now": rtt is not None and setup.rtt_seconds() < rtt}


def rank_sweep(s, setup, ranks, direction, r_c2d=64, r_d2c=None, **kw):
    """Decode tokens/s and bytes per token of PrivateLoRA for each rank in ``ranks``.

    ``direction``: ``both`` (r_c2d = r_d2c = rank), ``c2d`` (r_d2c held) or ``d2c`` (r_c2d held).
    Returns ``[{r_c2d, r_d2c, decode_tokens_per_s, decode_bytes_per_token, device_memory}]``."""
    if direction not in ("both", "c2d", "d2c"):
        raise ValueError(f"direction: must be both, c2d or d2c (got {direction!r})")
    rows = []
    for r in ranks:
        rc = r if direction in ("both", "c2d") else r_c2d
        rd = r if direction in ("both", "d2c") else (r_d2c or r_c2d)
        res = evaluate(s, setup, r_c2d=rc, r_d2c=rd, **kw)["privatelora"]
        rows.append({"r_c2d": rc, "r_d2c": rd, "decode_tokens_per_s": res["decode_tokens_per_s"],
                     "decode_bytes_per_token": res["decode_bytes_per_token"],
                     "device_memory": res["device_memory"]})
    return rows


__all__ = ["MODES", "PARTY", "CLOUD", "compare", "break_even_rtt", "rank_sweep", "paper_kwargs"]
