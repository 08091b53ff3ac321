"""PC-MoE host side: run hosted experts for another party's tokens, forward and backward.

A party that is not training this global step serves expert requests.  For a forward
request it runs the requested experts on the received hidden states and returns their
(unweighted) outputs; in training it keeps the inputs and the autograd graph until the
matching backward request, which brings the gradient w.r.t. those outputs: the host
back-propagates it into its expert weights (accumulating their gradients) and returns
the gradient w.r.t. the inputs.

When hosts step (a choice the paper leaves open): once per global step, in lockstep
with the active party's backbone.  The host steps lazily -- before it handles anything
that belongs to a later step (a training request of another step, an eval request, its
own turn, or the end of training) -- so no extra "step finished" message is needed and
the experts used in step s+1 always include the update of step s.  A host that got no
backward request in a step does not step (AdamW would otherwise still move its experts
by momentum alone).

Message kinds and their ``meta`` (every message carries ``layer``, ``experts``,
``counts`` -- rows per expert, in the order of ``experts`` --, ``origin``, ``host`` and
``direction``):

====================  ============  ===========  ==============================
kind                  direction     tensor       what it is
====================  ============  ===========  ==============================
``expert_fwd``        ``fwd``       hidden       owner -> host: expert inputs
``expert_out``        ``fwd_out``   output       host -> owner: expert outputs
``expert_bwd``        ``bwd``       grad_output  owner -> host: dL/d(output)
``expert_grad_in``    ``bwd_out``   grad_input   host -> owner: dL/d(hidden)
``eval_expert_fwd``   ``fwd``       hidden       the same, for held-out evaluation
``eval_expert_out``   ``fwd_out``   output
====================  ============  ===========  ==============================

Requests also carry ``phase`` (``train``/``eval``) unless the owner disguises its
evaluation (``eval_traffic: disguised``): then evaluation comes as ``expert_fwd`` with the
same meta as training, the host keeps the graph of every forward as for training, and a
forward that never gets its backward is dropped when the host steps -- the only sign of
evaluation the host gets, after the fact.  A forward request that arrives after a backward
of the same step starts a new pass, so the host applies the step's update first (the
experts an evaluation sees are updated, as with ``eval_expert_fwd``).

With ``dedup_rows`` an ``expert_fwd`` also holds ``row_index`` (int32 [sum(counts)]): the
``hidden`` row of each (token, expert) pair, pairs grouped by expert as ``counts`` says
(:mod:`parties.pcmoe.layout`).  ``output`` and ``grad_output`` then have one row per pair,
``grad_input`` one per ``hidden`` row (the sum over that row's pairs).
"""
import torch

from testbed.engine.codec import Message
from testbed.errors import ProtocolError

FWD, OUT, BWD, GRAD_IN = "expert_fwd", "expert_out", "expert_bwd", "expert_grad_in"
EVAL_FWD, EVAL_OUT = "eval_expert_fwd", "eval_expert_out"
REQUESTS = (FWD, BWD, EVAL_FWD)


def expert_meta(layer, experts, counts, origin, host, direction, phase):
    """The metadata an analyst needs to interpret an expert message's tensor (``phase``
    ``None``: left out, for disguised evaluation)."""
    meta = {"layer": layer, "experts": list(experts), "counts": list(counts), "origin": origin,
            "host": host, "direction": direction}
    return meta if phase is None else {**meta, "phase": phase}


class ExpertHost:
    """Serves one party's hosted experts. ``shards``: layer -> ExpertShard."""

    # False: the no-sharing ablation -- return dL/d(input) but never train the experts on
    # another party's tokens (pcmoe ``expert_training: own``)
    train_remote = True

    def __init__(self, name, shards, optimizer, tracker, meter):
        self.name, self.shards, self.opt = name, shards, optimizer
        self.tracker, self.meter = tracker, meter
        self._stored = {}        # (origin, step, layer) -> (input leaf, output, backward expected)
        self._step = None        # the global step whose gradients are accumulated
        self._dirty = False

    def serve(self, msg):
        """Handle one request message; return the reply Message."""
        if msg.kind == EVAL_FWD or self._step not in (None, msg.step) or (msg.kind == FWD and self._dirty):
            self.finalize()
        self._step = msg.step if msg.kind != EVAL_FWD else None
        if msg.kind in (FWD, EVAL_FWD):
            return self._forward(msg, train=msg.kind == FWD)
        if msg.kind == BWD:
            return self._backward(msg)
        raise ProtocolError(f"{self.name}: {msg.kind!r} from {msg.src} is not an expert request")

    def _check(self, msg, name):
        m = msg.meta
        try:
            layer, experts, counts = int(m["layer"]), list(m["experts"]), list(m["counts"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"{self.name}: {msg.kind} from {msg.src} lacks layer/experts/counts "
                                f"in meta {m}") from None
        shard = self.shards.get(layer)
        if shard is None:
            raise ProtocolError(f"{self.name}: {msg.kind} from {msg.src}: no MoE layer {layer}")
        foreign = [e for e in experts if not shard.hosts(e)]
        if foreign:
            raise ProtocolError(f"{self.name}: {msg.kind} from {msg.src} asks for experts {foreign} "
                                f"of layer {layer}; this party hosts {shard.hosted}")
        t, index = msg.tensors.get(name), msg.tensors.get("row_index")
        pairs = sum(counts) if index is None or index.dim() != 1 else len(index)
        if t is None or t.dim() != 2 or pairs != sum(counts) or len(counts) != len(experts) \
                or (index is None and t.shape[0] != pairs):
            raise ProtocolError(f"{self.name}: {msg.kind} from {msg.src}: tensor {name!r} of shape "
                                f"{None if t is None else list(t.shape)} does not match counts {counts} "
                                f"for experts {experts}")
        if index is not None and len(index) and (int(index.min()) < 0 or int(index.max()) >= t.shape[0]):
            raise ProtocolError(f"{self.name}: {msg.kind} from {msg.src}: row_index outside the "
                                f"{t.shape[0]} rows of {name!r}")
        return layer, experts, counts, shard, t, index

    def _forward(self, msg, train):
        layer, experts, counts, shard, x, index = self._check(msg, "hidden")
        x = x.to(shard.gate_up_proj.device, shard.gate_up_proj.dtype)
        if index is not None:
            index = index.to(x.device, torch.long)
        if train:
            with self.meter.scope():
                x = x.requires_grad_()
                y = shard.grouped(experts, counts, x if index is None else x[index])
            self._stored[(msg.src, msg.step, layer)] = (x, y, "phase" in msg.meta)
            self.tracker.add_activations(self.meter.total)
        else:
            with torch.no_grad():
                y = shard.grouped(experts, counts, x if index is None else x[index])
        meta = expert_meta(layer, experts, counts, msg.src, self.name, "fwd_out",
                           ("train" if train else "eval") if "phase" in msg.meta else None)
        return Message(kind=OUT if train else EVAL_OUT, step=msg.step, meta=meta,
                       tensors={"output": y.detach()})

    def _backward(self, msg):
        layer, experts, counts, _, grad, _ = self._check(msg, "grad_output")
        stored = self._stored.pop((msg.src, msg.step, layer), None)
        if stored is None:
            raise ProtocolError(f"{self.name}: {BWD} from {msg.src} for step {msg.step} layer {layer} "
                                "without a matching forward request")
        x, y, _ = stored
        if grad.shape != y.shape:
            raise ProtocolError(f"{self.name}: {BWD} from {msg.src}: grad_output {list(grad.shape)} "
                                f"!= expert output {list(y.shape)}")
        grad = grad.to(y.device, y.dtype)
        if self.train_remote:
            y.backward(grad)
            self._dirty = True
            grad_in = x.grad
        else:
            (grad_in,) = torch.autograd.grad(y, x, grad)
        meta = expert_meta(layer, experts, counts, msg.src, self.name, "bwd_out",
                           "train" if "phase" in msg.meta else None)
        return Message(kind=GRAD_IN, step=msg.step, meta=meta, tensors={"grad_input": grad_in.detach()})

    def finalize(self):
        """Apply the accumulated expert gradients of the finished global step.  Forwards of
        disguised requests (no ``phase``) that got no backward were evaluation: dropped."""
        left = ", ".join(f"{o} step {s} layer {l}" for (o, s, l), (_, _, strict) in self._stored.items() if strict)
        self._stored = {}
        if left:
            raise ProtocolError(f"{self.name}: forward requests never got their backward: {left}")
        if self._dirty:
            self.opt.step()
            self.tracker.update_state()
            self.opt.zero_grad(set_to_none=True)
            self._dirty = False
        self._step = None
        self.meter.reset()
