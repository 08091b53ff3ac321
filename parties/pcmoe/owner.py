"""PC-MoE owner side: one party's forward and backward with remote experts in the loop.

The owning party runs its backbone (embeddings, attention, norms, routers, LM head)
layer by layer inside its role generator, so it can yield between layers: at every MoE
layer its own router picks the top-k experts per token, tokens routed to a remote
expert go to that expert's host -- one ``expert_fwd`` message per (layer, host), every
expert of that host batched, rows grouped by expert -- and the owner combines local and
returned outputs with its own gate weights (see :mod:`parties.pcmoe.host` for the
message table).

Autograd cannot cross roles (or a yield), so the graph is cut at every MoE layer:

* ``x_in``  -- a leaf copy of the router/expert input ``x = post_attention_norm(h_mid)``,
* ``h_in``  -- a leaf copy of the residual ``h_mid``,
* ``y``     -- the received remote expert outputs, one leaf per host.

Backward runs from the top down in segments.  Segment ``l`` back-propagates from the
roots above it (the loss for the last layer, otherwise ``x`` and ``h_mid`` of layer
``l+1`` with their finished gradients) plus the router-logit gradient of the auxiliary
loss; that fills ``y.grad`` (complete: every path to it is above), ``h_in.grad`` and
the local part of ``x_in.grad``.  ``y.grad`` goes to each host (``expert_bwd``); the
returned gradient w.r.t. the hidden states it was sent (``expert_grad_in``) is
scatter-added into ``x_in.grad``; ``x`` and ``h_mid`` then become the next segment's
roots.  Every graph node is traversed exactly once, and the gradients equal those of
the unsplit model (tests/test_pcmoe.py checks both).

The router's load-balancing loss is computed by the owner from its own router logits
(transformers' ``load_balancing_loss_func`` on leaf copies, so its gradient can be fed
into each segment).  With ``noise_sigma > 0`` the hidden states sent to hosts carry
Gaussian noise; the host's gradient w.r.t. the noisy input is used as is
(straight-through).

The hiding options (``shuffle_rows``, ``dedup_rows``, ``pad_counts``) change only how a
message's rows are laid out (:mod:`parties.pcmoe.layout`): outputs are put back in plan
order and returned gradients scattered to their tokens through the owner's private
:class:`~parties.pcmoe.layout.Layout`, so the math is unchanged.  With
``disguise_eval`` evaluation passes use the training kinds and no message says
``phase`` (see :mod:`parties.pcmoe.protocol`).
"""
import importlib
from dataclasses import dataclass, field

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from testbed.engine.codec import Message
from testbed.engine.effects import Recv, Send
from testbed.errors import ProtocolError

from parties.base import party_name
from parties.layers import CACHE_KW
from .sharding import host_of, route
from .host import BWD, EVAL_FWD, EVAL_OUT, FWD, GRAD_IN, OUT, expert_meta
from .layout import WireLayout


@dataclass
class LayerPass:
    x: torch.Tensor                  # router/expert input, in the graph below the cut
    h_mid: torch.Tensor              # residual after attention, in the graph below the cut
    x_in: torch.Tensor               # leaf copy of x (training) or x itself (eval)
    h_in: torch.Tensor
    router_logits: torch.Tensor
    remote: dict = field(default_factory=dict)  # host -> [y leaf, Layout]


@dataclass
class Pass:
    logits: torch.Tensor = None
    layers: list = field(default_factory=list)
    local_pairs: int = 0             # (token, expert) pairs computed by the owner
    remote_pairs: int = 0            # (token, expert) pairs sent to hosts


def layer_masks(model, embeds, position_ids):
    """The attention mask of each decoder layer, as the model's own forward builds them."""
    cfg, n = model.config, len(model.model.layers)
    kw = dict(config=cfg, inputs_embeds=embeds, attention_mask=None, position_ids=position_ids,
              **{CACHE_KW: None})
    types = getattr(cfg, "layer_types", None)
    if types:
        masks = {t: (create_sliding_window_causal_mask if t == "sliding_attention" else create_causal_mask)(**kw)
                 for t in set(types)}
        return [masks[t] for t in types[:n]]
    fn = create_sliding_window_causal_mask if getattr(cfg, "sliding_window", None) else create_causal_mask
    return [fn(**kw)] * n


class Owner:
    """The forward/backward of the party that trains (or evaluates) on its own batch."""

    def __init__(self, index, n_parties, model, meter, tracker, noise_sigma=0.0, noise_gen=None,
                 record_route=None, wire=None, disguise_eval=False):
        self.name, self.n = party_name(index), n_parties
        self.record_route = record_route or (lambda **route: None)
        self.wire = wire or WireLayout()
        self.disguise_eval = disguise_eval
        self.model, self.meter, self.tracker = model, meter, tracker
        self.noise_sigma, self.noise_gen = noise_sigma, noise_gen
        cfg = model.config
        self.num_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.aux_coef = cfg.router_aux_loss_coef if getattr(cfg, "output_router_logits", False) else 0.0
        self._lb_loss = importlib.import_module(type(model).__module__).load_balancing_loss_func

    def _scope(self, train):
        return self.meter.scope() if train else torch.no_grad()

    # -- forward -------------------------------------------------------------------------
    def forward(self, ids, step, train):
        """Generator: the routed forward pass of ``ids``; returns a :class:`Pass`.

        ``train``: keep the cut graph for :meth:`backward` and use ``expert_fwd``
        messages; otherwise no graph and ``eval_expert_fwd`` (``expert_fwd`` when
        evaluation is disguised)."""
        wire_train = train or self.disguise_eval
        inner, p = self.model.model, Pass()
        with self._scope(train):
            a = inner.embed_tokens(ids)
            pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
            pos_emb = inner.rotary_emb(a, position_ids=pos)
            masks = layer_masks(self.model, a, pos)
        for l, layer in enumerate(inner.layers):
            with self._scope(train):
                lp, plan, weights = self._lower(layer, a, pos_emb, masks[l], pos, train)
                requests = self._requests(l, lp, plan, step, train, p)
            for host, msg in requests:
                yield Send(host, msg)
            outputs = {}
            for host, msg in requests:
                reply = yield Recv(src=host, kind=OUT if wire_train else EVAL_OUT)
                y = reply.tensors.get("output")
                want = [sum(lp.remote[host][1].counts), lp.x_in.shape[-1]]
                if reply.meta.get("layer") != l or y is None or list(y.shape) != want:
                    raise ProtocolError(f"{self.name}: bad {reply.kind} from {host} for layer {l}: "
                                        f"meta {reply.meta}, shape {None if y is None else list(y.shape)}")
                outputs[host] = y.to(lp.x_in.device, lp.x_in.dtype).requires_grad_(train)
            with self._scope(train):
                a = self._combine(layer, lp, plan, weights, outputs)
            p.layers.append(lp)
        with self._scope(train):
            p.logits = self.model.lm_head(inner.norm(a))
        if train:
            self.tracker.add_activations(self.meter.total)
        return p

    def _lower(self, layer, a, pos_emb, mask, pos, train):
        """Attention half of a decoder layer, the cut, and the router."""
        h, _ = layer.self_attn(hidden_states=layer.input_layernorm(a), position_embeddings=pos_emb,
                               attention_mask=mask, position_ids=pos)
        h_mid = a + h
        x = layer.post_attention_layernorm(h_mid)
        x_in = x.detach().requires_grad_() if train else x
        h_in = h_mid.detach().requires_grad_() if train else h_mid
        router_logits, weights, top_k_index = layer.mlp.gate(x_in.reshape(-1, x_in.shape[-1]))
        plan = route(top_k_index, self.num_experts)
        return LayerPass(x, h_mid, x_in, h_in, router_logits), plan, weights

    def _requests(self, l, lp, plan, step, train, p):
        """One message per remote host: the rows of every expert it hosts, batched."""
        flat = lp.x_in.detach().reshape(-1, lp.x_in.shape[-1])
        by_host = {}
        for e, token_idx, _ in plan:
            host = host_of(e, self.n)
            if party_name(host) == self.name:
                p.local_pairs += len(token_idx)
                continue
            p.remote_pairs += len(token_idx)
            by_host.setdefault(party_name(host), []).append((e, token_idx))
        out, seq_len = [], lp.x_in.shape[1]
        phase = None if self.disguise_eval else ("train" if train else "eval")
        for host in sorted(by_host, key=lambda h: int(h.split("-")[1])):
            lay = self.wire.lay_out(by_host[host])
            hidden = self.wire.hidden(lay, flat)
            if self.noise_sigma > 0:
                hidden = hidden + self.noise_sigma * torch.randn(
                    hidden.shape, generator=self.noise_gen).to(hidden.device, hidden.dtype)
            meta = expert_meta(l, lay.experts, lay.counts, self.name, host, "fwd", phase)
            if train or self.disguise_eval:   # truth for scoring: the (batch row, position) of every row sent
                self.record_route(party=self.name, step=step, layer=l, host=host,
                                  positions=[[r // seq_len, r % seq_len] if r >= 0 else [-1, -1]
                                             for r in lay.row_tokens.tolist()],
                                  **({} if train else {"eval": True}))
            lp.remote[host] = [None, lay]
            tensors = {"hidden": hidden.contiguous()}
            if lay.row_index is not None:
                tensors["row_index"] = lay.row_index.to(torch.int32)
            out.append((host, Message(kind=FWD if train or self.disguise_eval else EVAL_FWD, step=step,
                                      meta=meta, tensors=tensors)))
        return out

    def _combine(self, layer, lp, plan, weights, outputs):
        """Weighted sum of local and remote expert outputs (eager-implementation order),
        plus the shared expert where the family has one, plus the residual."""
        shape = lp.x_in.shape
        flat = lp.x_in.reshape(-1, shape[-1])
        remote = {}
        for host, entry in lp.remote.items():
            entry[0] = y = outputs[host]
            lay = entry[1]
            y = y if self.wire.plain() else y[lay.take.to(y.device)]   # back to plan order
            remote.update(zip(lay.experts, torch.split(y, lay.plan_counts)))
        local = [(e, t) for e, t, _ in plan if e not in remote]
        if local:  # every local expert in one grouped call
            counts = [len(t) for _, t in local]
            ys = layer.mlp.experts.grouped([e for e, _ in local], counts,
                                           flat[torch.cat([t for _, t in local])])
            remote.update(zip([e for e, _ in local], torch.split(ys, counts)))
        final = torch.zeros_like(flat)
        if plan:  # one weighted scatter-add, rows in the eager implementation's order
            token_idx = torch.cat([t for _, t, _ in plan])
            top_k_pos = torch.cat([k for _, _, k in plan])
            out = torch.cat([remote[e] for e, _, _ in plan]) * weights[token_idx, top_k_pos, None]
            final = final.index_add(0, token_idx, out.to(final.dtype))
        shared = getattr(layer.mlp, "shared_expert", None)
        if shared is not None:
            final = final + torch.sigmoid(layer.mlp.shared_expert_gate(flat)) * shared(flat)
        return lp.h_in + final.reshape(shape)

    # -- loss and backward ---------------------------------------------------------------
    def loss(self, p, ids):
        """(cross-entropy, aux) of a training pass, exactly as ``model(..., labels=ids).loss``
        adds them; the aux term is on leaf copies of the router logits."""
        ce = self.model.loss_function(p.logits, ids, self.model.config.vocab_size)
        leaves = [lp.router_logits.detach().requires_grad_() for lp in p.layers]
        aux = self.aux_coef * self._lb_loss(tuple(leaves), self.num_experts, self.top_k, None) \
            if self.aux_coef else None
        return ce, aux, leaves

    def backward(self, p, ids, step):
        """Generator: staged backward of a training pass (see the module docstring);
        returns the loss value (cross-entropy + aux) as a float."""
        ce, aux, leaves = self.loss(p, ids)
        total = ce.detach() + aux.detach() if aux is not None else ce.detach()
        if aux is not None:
            aux.backward()
        roots, grads = [ce], [None]
        for l in reversed(range(len(p.layers))):
            lp = p.layers[l]
            if aux is not None:
                roots.append(lp.router_logits)
                grads.append(leaves[l].grad)
            torch.autograd.backward(roots, grads)
            gx = lp.x_in.grad.view(-1, lp.x_in.shape[-1])  # a view: index_add_ lands in x_in.grad
            hosts = list(lp.remote)
            phase = None if self.disguise_eval else "train"
            for host in hosts:
                y, lay = lp.remote[host]
                meta = expert_meta(l, lay.experts, lay.counts, self.name, host, "bwd", phase)
                # dummy rows' outputs were dropped: their gradient is zero
                yield Send(host, Message(kind=BWD, step=step, meta=meta,
                                         tensors={"grad_output": y.grad.detach()}))
            for host in hosts:
                reply = yield Recv(src=host, kind=GRAD_IN)
                rows = lp.remote[host][1].row_tokens
                g = reply.tensors.get("grad_input")
                if reply.meta.get("layer") != l or g is None or g.shape[0] != len(rows):
                    raise ProtocolError(f"{self.name}: bad {GRAD_IN} from {host} for layer {l}: "
                                        f"meta {reply.meta}, shape {None if g is None else list(g.shape)}")
                real = rows >= 0
                gx.index_add_(0, rows[real].to(gx.device), g[real.to(g.device)].to(gx.device, gx.dtype))
            roots, grads = [lp.x, lp.h_mid], [lp.x_in.grad, lp.h_in.grad]
        torch.autograd.backward(roots, grads)
        return total.item()
