"""Analytic training step time of PC-MoE over a network, for real MoE shapes.

One PC-MoE global step (:mod:`parties.pcmoe`) is one party -- the *owner* -- training one
local mini-batch of ``T = batch x seq_len`` tokens while the other parties serve its remote
experts.  The step, as the embedded engine runs it:

1. the coordinator's ``turn`` reaches the owner (one control message);
2. forward, layer by layer: the owner's backbone (attention, router, its local experts)
   computes; at every MoE layer it sends one ``expert_fwd`` message to each remote host
   (rows grouped by expert, one row per routed (token, expert) pair) -- all at once, in
   host order, serialized one after the other on its uplink -- and waits for every
   ``expert_out``; each host computes its experts' forward on arrival and replies (replies
   queue on the owner's downlink in order of readiness);
3. backward, layer by layer from the top: the same with ``expert_bwd`` / ``expert_grad_in``
   (hosts run the experts' backward: twice the forward FLOPs);
4. ``done`` goes back to the coordinator.

So every MoE layer costs two sequential round trips per direction of training
(forward and backward: 4 messages per remote host), and nothing overlaps the owner's
compute.  :func:`pcmoe_step` computes the step from those rules with the message sizes
framed exactly as :mod:`testbed.engine.codec` frames them, compute as FLOPs (and,
optionally, memory bytes) against :mod:`testbed.engine.devices` profiles, and links as
:mod:`testbed.engine.links` models them (serialization at min(sender up, receiver down),
FIFO per direction, then both one-way latencies plus the mean |N(0, jitter)|).
``tests/test_steptime.py`` runs the protocol in the embedded engine in ``compute: flops``
mode and checks that the model gives the same simulated step times.

FLOPs (``2 x MACs`` per token; backward = 2 x forward, as ``FlopCounterMode`` counts the
engine's matmuls): attention projections ``H*q + 2*H*kv + q*H``, router ``H*E``, each
(token, expert) pair ``3*H*I``, a shared expert ``3*H*I_s + H``, the LM head ``H*V`` on every
position; with ``count_attention`` also ``4*S*q`` per token for scores and values (the
engine's ``FlopCounterMode`` does not see PyTorch's CPU SDPA kernel, so validation leaves
them out).  With ``memory_traffic`` a side's time is the roofline max of FLOPs and bytes:
weights read three times per step (forward, both backward matmuls) and AdamW's step
(read weights, gradients and two moments, write weights and moments: 7 x weight bytes).

Expert traffic comes from a :class:`Routing`: ``uniform`` (every expert gets ``T*k/E`` of
each layer's pairs -- what a balanced router converges to) or the shares measured from a
run directory's capture (:func:`routing_from_run`).
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

from parties.pcmoe.host import BWD, FWD, GRAD_IN, OUT, expert_meta
from testbed.errors import ConfigError

from .throughput import frame_bytes

WIRE_DTYPES = {2: "bfloat16", 4: "float32"}


@dataclass(frozen=True)
class MoEShape:
    """What a step costs per token, from a model's config (meta device or real)."""

    layers: int
    hidden: int
    q_dim: int
    kv_dim: int
    vocab: int
    num_experts: int
    top_k: int
    expert_intermediate: int
    shared_intermediate: int = 0
    dtype_bytes: int = 2
    backbone_params: int = 0
    expert_params: int = 0       # all routed experts, all layers

    @classmethod
    def from_model(cls, model, dtype_bytes=2):
        from .projection import model_stats
        st, cfg = model_stats(model), model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if not st.num_experts:
            raise ConfigError("--model", [f"{cfg.model_type} has no routed experts; PC-MoE needs an MoE model"])
        return cls(st.layers, st.hidden, cfg.num_attention_heads * head_dim, st.kv_dim, st.vocab,
                   st.num_experts, st.top_k, st.expert_intermediate, st.shared_intermediate, dtype_bytes,
                   st.backbone_params, st.expert_params)

    @property
    def backbone_macs(self):
        """Per token per layer, outside the routed experts."""
        H = self.hidden
        shared = 3 * H * self.shared_intermediate + H if self.shared_intermediate else 0
        return H * self.q_dim + 2 * H * self.kv_dim + self.q_dim * H + H * self.num_experts + shared

    @property
    def pair_macs(self):
        return 3 * self.hidden * self.expert_intermediate

    @property
    def params_per_expert(self):
        return self.expert_params / (self.num_experts * self.layers)

    def hosted(self, party, n):
        """Experts of a layer that ``party`` hosts (round-robin, :mod:`parties.pcmoe.sharding`)."""
        return [e for e in range(self.num_experts) if e % n == party]


@dataclass(frozen=True)
class Routing:
    """Share of a layer's (token, expert) pairs that go to each expert: ``shares[layer][e]``
    (each row sums to 1); ``source`` says where it comes from."""

    shares: tuple
    source: str = "uniform"

    @classmethod
    def uniform(cls, shape):
        return cls(tuple((1 / shape.num_experts,) * shape.num_experts for _ in range(shape.layers)))

    def counts(self, layer, tokens, top_k):
        """Expected rows per expert of one layer for ``tokens`` tokens (rounded to whole rows)."""
        return [round(tokens * top_k * s) for s in self.shares[layer % len(self.shares)]]


@dataclass(frozen=True)
class Deployment:
    """Device profile and link of the owner, of each host, of the coordinator."""

    party_device: object
    party_link: object
    coordinator_link: object
    coordinator_device: object = None

    def latency(self, a, b):
        jitter = (a.jitter_ms + b.jitter_ms) / 1e3 * math.sqrt(2 / math.pi)
        return (a.latency_ms + b.latency_ms) / 1e3 + jitter

    def transfer(self, a, b, nbytes):
        """-> (serialization, latency) seconds of ``nbytes`` from link ``a`` to link ``b``."""
        return nbytes * 8 / (min(a.up_mbps, b.down_mbps) * 1e6), self.latency(a, b)


def seconds(flops, nbytes, device):
    """The engine's roofline (:func:`testbed.engine.devices.modelled_seconds`)."""
    return max(flops / device.flops, nbytes / device.mem_bw)


def _frame(kind, owner, host, step, layer, experts, counts, tensor, rows, shape):
    direction = {FWD: "fwd", OUT: "fwd_out", BWD: "bwd", GRAD_IN: "bwd_out"}[kind]
    src, dst = (owner, host) if kind in (FWD, BWD) else (host, owner)
    meta = expert_meta(layer, experts, counts, owner, host, direction, "train")
    return frame_bytes({"kind": kind, "src": src, "dst": dst, "step": step, "meta": meta,
                        "tensors": {tensor: (WIRE_DTYPES[shape.dtype_bytes], [rows, shape.hidden])}})


def control_bytes(step, owner, rnd=0):
    """Frame sizes of the coordinator's ``turn`` and the owner's ``done``."""
    turn = frame_bytes({"kind": "turn", "src": "coordinator", "dst": owner, "step": step,
                        "meta": {"party": owner, "round": rnd}, "tensors": {}})
    done = frame_bytes({"kind": "done", "src": owner, "dst": "coordinator", "step": step, "meta": {},
                        "tensors": {}})
    return turn, done


def exchange_seconds(dep, requests):
    """Time from the owner's sends to the last reply: ``requests`` = [(send bytes, reply bytes,
    host compute seconds)] in send order.  Sends share the owner's uplink (one after the
    other), replies its downlink (FIFO in order of readiness)."""
    link = dep.party_link
    ready, up = [], 0.0
    for send, reply, compute in requests:
        ser, lat = dep.transfer(link, link, send)
        up += ser
        ready.append((up + lat + compute, reply))
    down, last = 0.0, 0.0
    for t, reply in sorted(ready, key=lambda x: x[0]):
        ser, lat = dep.transfer(link, link, reply)
        down = max(t, down) + ser
        last = max(last, down + lat)
    return last


def layer_traffic(shape, routing, owner, n, tokens):
    """{layer: {host: (experts, counts)}} of the remote pairs, and the local pair count,
    for one step of ``owner`` under ``routing``."""
    traffic, local = {}, 0
    for layer in range(shape.layers):
        counts = routing.counts(layer, tokens, shape.top_k)
        hosts = {}
        for e, c in enumerate(counts):
            h = e % n
            if h == owner:
                local += c
            elif c:
                hosts.setdefault(h, ([], []))
                hosts[h][0].append(e)
                hosts[h][1].append(c)
        traffic[layer] = hosts
    return traffic, local


def pcmoe_step(shape, dep, n, owner, traffic, local_pairs, batch, seq_len, step=0,
               count_attention=True, memory_traffic=True, control=True):
    """Seconds of one PC-MoE global step of party ``owner`` (see the module docstring).

    ``traffic``: {layer: {host index: (experts, counts)}}; ``local_pairs``: pairs the owner
    computes itself.  Returns a dict of the parts (owner compute, exchange per direction,
    control) and totals, and the bytes and messages on the wire."""
    T, H, dev = batch * seq_len, shape.hidden, dep.party_device
    me = f"party-{owner}"
    fwd_flops = 2 * (T * shape.layers * shape.backbone_macs + local_pairs * shape.pair_macs + T * H * shape.vocab)
    if count_attention:
        fwd_flops += batch * shape.layers * 4 * seq_len * seq_len * shape.q_dim
    owner_bytes = 0.0
    if memory_traffic:
        hosted = len(shape.hosted(owner, n)) * shape.params_per_expert * shape.layers
        owner_bytes = (3 + 7) * (shape.backbone_params + hosted) * shape.dtype_bytes
    owner_s = seconds(3 * fwd_flops, owner_bytes, dev)
    parts = {"owner_compute": owner_s, "expert_fwd": 0.0, "expert_bwd": 0.0, "host_compute": 0.0}
    wire, msgs = 0, 0
    for layer, hosts in traffic.items():
        for direction, (send_kind, reply_kind, tensors, mult) in {
                "expert_fwd": (FWD, OUT, ("hidden", "output"), 1),
                "expert_bwd": (BWD, GRAD_IN, ("grad_output", "grad_input"), 2)}.items():
            reqs = []
            for h in sorted(hosts):
                experts, counts = hosts[h]
                rows = sum(counts)
                host = f"party-{h}"
                send = _frame(send_kind, me, host, step, layer, experts, counts, tensors[0], rows, shape)
                reply = _frame(reply_kind, me, host, step, layer, experts, counts, tensors[1], rows, shape)
                exp_bytes = 3 * len(experts) * shape.params_per_expert * shape.dtype_bytes if memory_traffic else 0
                c = seconds(mult * 2 * rows * shape.pair_macs, exp_bytes / 3 * mult, dev)
                reqs.append((send, reply, c))
                parts["host_compute"] += c
                wire, msgs = wire + send + reply, msgs + 2
            parts[direction] += exchange_seconds(dep, reqs)
    parts["control"] = 0.0
    if control:
        turn, done = control_bytes(step, me)
        for a, b, nb in ((dep.coordinator_link, dep.party_link, turn), (dep.party_link, dep.coordinator_link, done)):
            ser, lat = dep.transfer(a, b, nb)
            parts["control"] += ser + lat
    total = parts["owner_compute"] + parts["expert_fwd"] + parts["expert_bwd"] + parts["control"]
    rtts = sum(1 for hosts in traffic.values() for _ in hosts) * 2
    return {"total_s": total, **{f"{k}_s": v for k, v in parts.items()}, "bytes": wire, "messages": msgs,
            "sequential_round_trips": sum(2 for hosts in traffic.values() if hosts),
            "host_round_trips": rtts, "tokens": T, "flops": 3 * fwd_flops}


def mean_pcmoe_step(shape, dep, n, routing, batch, seq_len, **kw):
    """The step time averaged over which party owns the step (each equally often)."""
    steps = []
    for owner in range(n):
        traffic, local = layer_traffic(shape, routing, owner, n, batch * seq_len)
        steps.append(pcmoe_step(shape, dep, n, owner, traffic, local, batch, seq_len, **kw))
    return {k: sum(s[k] for s in steps) / n for k in steps[0]}


def routing_from_run(run_dir, shape, protocol="pcmoe"):
    """Per-layer expert shares measured from a run directory's capture.

    Every ``expert_fwd`` message carries the rows sent to each remote expert; an expert's
    share in a layer is its rows over ``tokens x top_k`` of the steps where it was remote
    (an owner's own experts never appear on the wire), normalised per layer.  The run's
    experts per layer must equal the shape's; its layer count may differ (then the run's
    layers are reused cyclically)."""
    run = Path(run_dir)
    index, metrics = run / "capture" / "index.jsonl", run / "metrics.jsonl"
    for f in (index, metrics):
        if not f.exists():
            raise ConfigError(str(run), [f"{f.name}: missing (expected a PC-MoE run directory with capture)"])
    tokens = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("protocol") == protocol and rec.get("event") == "train":
            tokens[(rec["party"], rec["step"])] = rec["tokens"]
    rows, seen = {}, {}
    for line in index.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("protocol") != protocol or rec.get("kind") != FWD:
            continue
        m = rec["meta"]
        t = tokens.get((m["origin"], rec["step"]))
        if t is None:
            continue
        for e, c in zip(m["experts"], m["counts"]):
            rows[(m["layer"], e)] = rows.get((m["layer"], e), 0) + c
            seen[(m["layer"], e)] = seen.get((m["layer"], e), 0) + t
    if not rows:
        raise ConfigError(str(run), [f"capture/index.jsonl: no {FWD} messages of protocol {protocol!r}"])
    layers = 1 + max(l for l, _ in rows)
    experts = 1 + max(e for _, e in rows)
    if experts > shape.num_experts or any(
            (l, e) not in seen for l in range(layers) for e in range(shape.num_experts)):
        raise ConfigError(str(run), [f"routing: the run's layers do not cover the model's "
                                     f"{shape.num_experts} experts per layer (seen {experts}); "
                                     "use a run of a model with the same number of experts"])
    shares = []
    for l in range(layers):
        raw = [rows.get((l, e), 0) / seen[(l, e)] / shape.top_k for e in range(shape.num_experts)]
        total = sum(raw) or 1.0
        shares.append(tuple(r / total for r in raw))
    return Routing(tuple(shares), source=f"measured in {run}")
