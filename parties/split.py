"""``split``: vanilla split learning -- the party runs the bottom of the model, a server the rest.

Split learning (Gupta & Raskar 2018, https://arxiv.org/abs/1810.06060; Vepakomma et al.
2018, https://arxiv.org/abs/1812.00564 for the U-shaped variant).  Options:

* ``cut_layer`` (default 1): the party holds the token embeddings and decoder blocks
  ``0 .. cut_layer-1`` (0 = cut right after the embeddings); the ``server`` role holds
  blocks ``cut_layer ..`` and, unless U-shaped, the final norm and LM head.
* ``u_shape`` (default false): the party also keeps the final norm + LM head, so labels
  never leave it; the server returns the last hidden state and receives its gradient.
* ``sync``: ``none`` (default; each party keeps its own party-side layers) or ``splitfed``
  (SplitFed v1, Thapa et al. 2022, https://arxiv.org/abs/2004.12088: after every step each
  party sends its party-side weights to a separate ``fedserver`` role, which returns their
  mean weighted by training rows; every party continues from that mean).

One training step is one round robin: party 0, 1, ... each train one private mini-batch
through the shared server, which takes one optimizer step per party batch (so the server
steps ``parties`` times per training step).  Messages, per party batch:

* ``act``  party -> server: cut-layer activations ``act`` [B, T, H] (meta ``layer`` =
  cut_layer, ``party``, ``direction: fwd``), plus ``labels`` [B, T] int64 unless U-shaped;
* U-shaped only: ``hidden`` server -> party (last decoder hidden state before the final
  norm, meta ``layer`` = num_layers) and ``hidden_grad`` back;
* ``grad`` server -> party: d loss / d act (``direction: bwd``).

Evaluation goes through the same path (kinds ``eval_act`` / ``eval_out``, meta
``eval: true``): each party reports the held-out loss of (its bottom + the server) on its
own eval set.  MoE router auxiliary losses are computed per side over that side's blocks.

    python -m testbed run scenarios/split-4party.yaml
"""
import torch

from testbed.engine.codec import Message
from testbed.engine.effects import Log, Recv, Send
from testbed.errors import ConfigError, ProtocolError

from . import layers as L
from .base import Protocol, is_eval_step, make_optimizer, party_name
from parties.federated.dp import dp_config, make_private
from parties.federated.rounds import check_options, recv_any, tensor_bytes, weighted_mean

SERVER, FEDSERVER = "server", "fedserver"


def _check_bool(v, _n):
    return None if isinstance(v, bool) else "must be true or false"


def _check_sync(v, _n):
    return None if v in ("none", "splitfed") else "must be 'none' or 'splitfed'"


def _check_cut(v, _n):
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "must be an integer >= 0"


def _sum_ce(logits, ids):
    logits = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1), reduction="sum").item()


def _backward(out, grad, aux):
    """Backward from ``out`` with incoming ``grad``, plus this side's router aux loss."""
    if aux.requires_grad:
        torch.autograd.backward([out, aux], [grad, torch.ones_like(aux)])
    else:
        out.backward(grad)


class Split(Protocol):
    name = "split"
    OPTIONS = {"cut_layer": (_check_cut, 1), "u_shape": (_check_bool, False),
               "sync": (_check_sync, "none")}

    def __init__(self, ctx):
        super().__init__(ctx)
        self.opts = check_options(ctx.options, self.OPTIONS, len(ctx.parties))
        self.k, self.u = self.opts["cut_layer"], self.opts["u_shape"]
        self.n_layers = ctx.scenario.model.num_layers
        top = self.n_layers - 1 if self.u else self.n_layers
        if self.k > top:
            raise ConfigError("protocol.options", [
                f"cut_layer: must be <= {top} ({self.n_layers} layers"
                f"{', and the U-shaped server needs at least one block' if self.u else ''}) "
                f"(got {self.k})"])
        self.server_roles = (SERVER, FEDSERVER) if self.opts["sync"] == "splitfed" else (SERVER,)

    def expected_train_logs(self):
        return self.ctx.training.steps * len(self.ctx.parties)

    def roles(self):
        out = {party_name(i): self.party(i) for i in range(len(self.ctx.parties))}
        out[SERVER] = self.server()
        if FEDSERVER in self.server_roles:
            out[FEDSERVER] = self.fedserver()
        return out

    def _meta(self, me, **kw):
        return {"party": me, "layer": self.k, "u_shape": self.u, **kw}

    # -- party -----------------------------------------------------------------------------
    def party(self, i):
        ctx, tr, me = self.ctx, self.ctx.training, party_name(i)
        model = L.keep_only(ctx.build_model(), embed=True, blocks=range(self.k), head=self.u)
        model = model.to(ctx.device).train()
        opt = make_optimizer(model.parameters(), tr)
        mem, gen, data = ctx.tracker(me), ctx.generator(me), ctx.parties[i]
        mem.attach([model], [opt])
        cfg = dp_config(ctx)
        private = make_private(model, opt, len(data.train), tr.batch_size, cfg,
                               generator=ctx.generator(me, "dp")) if cfg else None
        stash = {}
        for t in range(tr.steps):
            ids = data.sample(tr.batch_size, gen).to(ctx.device)
            ctx.record_truth(me, t, ids)
            rl = []
            with mem.activations_scope():
                act = L.run_blocks(model, L.run_embed(model, ids), 0, self.k, router_logits=rl)
                aux = L.aux_loss(model, rl)
            tensors = {"act": act.detach()} if self.u else {"act": act.detach(), "labels": ids}
            yield Send(SERVER, Message("act", step=t, meta=self._meta(me, direction="fwd"), tensors=tensors))
            record = {}
            if self.u:
                msg = yield from recv_any(stash, SERVER, [("hidden", t)])
                hid = msg.tensors["hidden"].to(ctx.device).requires_grad_()
                with mem.activations_scope():
                    loss = L.causal_lm_loss(L.run_head(model, hid), ids) + aux.detach() + msg.meta["aux"]
                loss.backward()
                record["loss"] = loss.item()
                yield Send(SERVER, Message("hidden_grad", step=t, tensors={"hidden_grad": hid.grad},
                                           meta=self._meta(me, layer=self.n_layers, direction="bwd")))
            msg = yield from recv_any(stash, SERVER, [("grad", t)])
            _backward(act, msg.tensors["grad"].to(ctx.device), aux)
            (private or opt).step()
            mem.update_state()
            private.zero_grad() if private else opt.zero_grad(set_to_none=True)
            if not self.u:
                record["loss"] = msg.meta["loss"]
            record.update(tokens=ids.numel(), **(private.log_fields() if private else {}))
            yield Log({"event": "train", "role": me, "party": me, "step": t, **record})
            if FEDSERVER in self.server_roles:
                yield from self._sync(model, me, t, len(data.train), stash)
            if is_eval_step(t, tr):
                yield from self._party_eval(model, me, t, data, stash)

    def _sync(self, model, me, t, n_rows, stash):
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        yield Send(FEDSERVER, Message("weights", step=t, tensors=weights,
                                      meta={"party": me, "round": t, "n_samples": n_rows}))
        msg = yield from recv_any(stash, FEDSERVER, [("avg_weights", t)])
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(msg.tensors[n])

    def _party_eval(self, model, me, t, data, stash):
        ctx, tr = self.ctx, self.ctx.training
        batches = data.eval_batches(tr.batch_size, tr.eval_batches)
        total, count = 0.0, 0
        model.eval()
        for j, ids in enumerate(batches):
            ids = ids.to(ctx.device)
            with torch.no_grad():
                act = L.run_blocks(model, L.run_embed(model, ids), 0, self.k)
            tensors = {"act": act} if self.u else {"act": act, "labels": ids}
            yield Send(SERVER, Message("eval_act", step=t, tensors=tensors, meta=self._meta(
                me, direction="fwd", eval=True, index=j, of=len(batches))))
            msg = yield from recv_any(stash, SERVER, [("eval_out", t)])
            if self.u:
                with torch.no_grad():
                    total += _sum_ce(L.run_head(model, msg.tensors["hidden"].to(ctx.device)), ids)
            else:
                total += msg.meta["loss_sum"]
            count += ids[:, 1:].numel()
        model.train()
        yield Log({"event": "eval", "role": me, "party": me, "step": t, "eval_loss": total / max(count, 1)})

    # -- server ----------------------------------------------------------------------------
    def server(self):
        ctx, tr, n = self.ctx, self.ctx.training, len(self.ctx.parties)
        model = L.keep_only(ctx.build_model(), blocks=range(self.k, self.n_layers), head=not self.u)
        model = model.to(ctx.device).train()
        opt = make_optimizer(model.parameters(), tr)
        mem = ctx.tracker(SERVER)
        mem.attach([model], [opt])
        for t in range(tr.steps):
            for i in range(n):
                yield from self._server_turn(model, opt, mem, party_name(i), t)
            if is_eval_step(t, tr):
                for i in range(n):
                    yield from self._server_eval(model, party_name(i), t)

    def _server_turn(self, model, opt, mem, who, t):
        msg = yield Recv(src=who, kind="act")
        if msg.step != t:
            raise ProtocolError(f"{SERVER}: expected {who}'s act for step {t}, got step {msg.step}")
        h = msg.tensors["act"].to(self.ctx.device).requires_grad_()
        rl = []
        with mem.activations_scope():
            out = L.run_blocks(model, h, self.k, self.n_layers, router_logits=rl)
            aux = L.aux_loss(model, rl)
            if not self.u:
                ids = msg.tensors["labels"].to(self.ctx.device)
                loss = L.causal_lm_loss(L.run_head(model, out), ids) + aux
        if self.u:
            yield Send(who, Message("hidden", step=t, tensors={"hidden": out.detach()}, meta=self._meta(
                who, layer=self.n_layers, direction="fwd", aux=aux.item())))
            back = yield Recv(src=who, kind="hidden_grad")
            _backward(out, back.tensors["hidden_grad"].to(self.ctx.device), aux)
        else:
            loss.backward()
        extra = {} if self.u else {"loss": loss.item()}
        yield Send(who, Message("grad", step=t, tensors={"grad": h.grad},
                                meta=self._meta(who, direction="bwd", **extra)))
        opt.step()
        mem.update_state()
        opt.zero_grad(set_to_none=True)

    def _server_eval(self, model, who, t):
        model.eval()
        while True:
            msg = yield Recv(src=who, kind="eval_act")
            with torch.no_grad():
                out = L.run_blocks(model, msg.tensors["act"].to(self.ctx.device), self.k, self.n_layers)
                if self.u:
                    tensors, extra = {"hidden": out}, {"layer": self.n_layers}
                else:
                    ids = msg.tensors["labels"].to(self.ctx.device)
                    tensors, extra = {}, {"loss_sum": _sum_ce(L.run_head(model, out), ids)}
            yield Send(who, Message("eval_out", step=t, tensors=tensors, meta=self._meta(
                who, direction="fwd", eval=True, index=msg.meta["index"], **extra)))
            if msg.meta["index"] + 1 >= msg.meta["of"]:
                break
        model.train()

    # -- SplitFed's fed server -------------------------------------------------------------
    def fedserver(self):
        ctx, n = self.ctx, len(self.ctx.parties)
        mem = ctx.tracker(FEDSERVER)
        mem.attach([], [])
        for t in range(ctx.training.steps):
            got = {}
            while len(got) < n:
                msg = yield Recv(kind="weights")
                if msg.step != t:
                    raise ProtocolError(f"{FEDSERVER}: weights from {msg.src} for step {msg.step}, "
                                        f"expected step {t}")
                got[msg.src] = msg
            ordered = [got[party_name(i)] for i in range(n)]
            avg = weighted_mean([(m.tensors, m.meta["n_samples"]) for m in ordered])
            mem.add_activations(sum(tensor_bytes(m.tensors) for m in ordered) + tensor_bytes(avg))
            for i in range(n):
                yield Send(party_name(i), Message("avg_weights", step=t, tensors=avg,
                                                  meta={"round": t, "parties": n}))
