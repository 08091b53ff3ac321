"""Step times of the baselines PC-MoE is compared with, on the same shapes, devices and links.

All per mini-batch of ``T = batch x seq_len`` tokens, with the FLOPs of
:mod:`testbed.costs.steptime` (every routed pair computed where the model is whole):

* ``centralized`` -- one device holds the whole model and all data: compute only;
* ``fedavg`` -- every party trains a full copy for ``local_steps`` mini-batches in parallel,
  then uploads its weight delta (all parameters at the training dtype) and downloads the
  average; the coordinator's link carries all ``n`` transfers, sharing its bandwidth (the
  round takes the slower of one party's link and ``n`` transfers on the coordinator's);
  one round trains ``n x local_steps`` mini-batches, so a mini-batch costs round / that;
* ``split`` -- vanilla split learning (:mod:`parties.split`): the party computes the
  embeddings and the first ``cut`` blocks, sends the cut activations [T, H] and the labels
  (int64) to the server, which runs the rest and the LM head and returns the gradient
  [T, H]; party batches run one after the other through the server.

Payloads only (codec framing is negligible at these sizes); latency and jitter as in
:mod:`testbed.costs.steptime`.
"""
from .steptime import seconds


def _fwd_flops(shape, layers, tokens, batch, seq_len, count_attention, head=True):
    f = 2 * tokens * layers * (shape.backbone_macs + shape.top_k * shape.pair_macs)
    if head:
        f += 2 * tokens * shape.hidden * shape.vocab
    if count_attention:
        f += batch * layers * 4 * seq_len * seq_len * shape.q_dim
    return f


def _state_bytes(shape, params, memory_traffic):
    return (3 + 7) * params * shape.dtype_bytes if memory_traffic else 0


def centralized_step(shape, device, batch, seq_len, count_attention=True, memory_traffic=True):
    T = batch * seq_len
    flops = 3 * _fwd_flops(shape, shape.layers, T, batch, seq_len, count_attention)
    params = shape.backbone_params + shape.expert_params
    t = seconds(flops, _state_bytes(shape, params, memory_traffic), device)
    return {"total_s": t, "compute_s": t, "network_s": 0.0, "bytes": 0, "flops": flops, "tokens": T}


def fedavg_step(shape, dep, n, batch, seq_len, local_steps=2, **kw):
    local = centralized_step(shape, dep.party_device, batch, seq_len, **kw)
    model_bytes = (shape.backbone_params + shape.expert_params) * shape.dtype_bytes
    p, c = dep.party_link, dep.coordinator_link
    lat = dep.latency(p, c)
    up = max(model_bytes * 8 / (p.up_mbps * 1e6), n * model_bytes * 8 / (c.down_mbps * 1e6)) + lat
    down = max(model_bytes * 8 / (p.down_mbps * 1e6), n * model_bytes * 8 / (c.up_mbps * 1e6)) + lat
    rnd = local_steps * local["compute_s"] + up + down
    per = n * local_steps
    return {"total_s": rnd / per, "round_s": rnd, "compute_s": local_steps * local["compute_s"] / per,
            "network_s": (up + down) / per, "bytes": 2 * n * model_bytes / per, "flops": local["flops"],
            "tokens": batch * seq_len, "local_steps": local_steps}


def split_step(shape, dep, batch, seq_len, cut=1, server_device=None, count_attention=True,
               memory_traffic=True):
    T, H = batch * seq_len, shape.hidden
    per_block = shape.params_per_expert * shape.num_experts + shape.backbone_params / shape.layers
    party_f = 3 * _fwd_flops(shape, cut, T, batch, seq_len, count_attention, head=False)
    server_f = 3 * _fwd_flops(shape, shape.layers - cut, T, batch, seq_len, count_attention)
    party_t = seconds(party_f, _state_bytes(shape, cut * per_block, memory_traffic), dep.party_device)
    server_t = seconds(server_f, _state_bytes(shape, (shape.layers - cut) * per_block, memory_traffic),
                       server_device or dep.party_device)
    act, labels = T * H * shape.dtype_bytes, T * 8
    up = sum(dep.transfer(dep.party_link, dep.coordinator_link, act + labels))
    down = sum(dep.transfer(dep.coordinator_link, dep.party_link, act))
    return {"total_s": party_t + server_t + up + down, "compute_s": party_t + server_t,
            "network_s": up + down, "bytes": 2 * act + labels, "flops": party_f + server_f,
            "tokens": T, "cut": cut}
