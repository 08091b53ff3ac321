"""``privatelora``: PrivateLoRA -- the cloud runs the frozen decoder, each device trains its own M.

Paper: Wang et al., "PrivateLoRA For Efficient Privacy Preserving LLM", arXiv 2311.14030.

Roles:

* ``cloud`` (one, on the coordinator's endpoint): every decoder layer and the final
  norm, frozen, plus frozen random A (d×r_c2d) and B (r_d2c×d_out) on q, k, v of
  every layer (see :mod:`parties.privatelora.lowrank`).  It never holds embeddings or the LM head.
* ``party-i`` (a device): tokenizer-side ends (embeddings, LM head, frozen), its data,
  and its own trainable M (r_c2d×r_d2c, zero-init) for q, k, v of every layer.  It
  never holds a decoder layer.

One pass: the device uploads token embeddings; for each layer the cloud sends A·x
(x = the attention's normed input), the device returns M·A·x, and the cloud adds
(M·A·x)·B to W_q x, W_k x, W_v x; the cloud returns the final normed hidden state and
the device applies the head and the loss.  Backward retraces the route: dL/d(hidden)
up, then per layer from last to first dL/d(M·A·x) down and dL/d(A·x) up (see
:mod:`parties.privatelora.wire` for every message).  Autograd never crosses a role: each
side rebuilds leaf tensors from decoded messages and runs staged
``torch.autograd.backward(tensors, grad_tensors)`` layer by layer.

Schedule: devices take turns round-robin -- at global step s the cloud serves party-0's
mini-batch (forward and backward), then party-1's, and so on; each device evaluates
on its own held-out rows through the same route on eval steps (and at step -1, the
frozen base, with ``eval_base``), and finally generates ``generate_tokens`` tokens
greedily from a ``prompt_len``-token prompt with the cloud keeping its KV cache
(per-device state; one prefill pass, then one pass per new token).

Options (``protocol.options``): ``rank`` (or ``r_c2d``/``r_d2c``), ``wire_dtype``,
``generate_tokens``, ``prompt_len``, ``eval_base``, ``weight_traffic`` (model the
weight and KV-cache reads of generation as ``Compute(bytes=...)``; default on with
``compute.mode: flops``), ``lora_alpha`` (for the LoRA baselines).

    python -m testbed run scenarios/privatelora-tiny.yaml
"""
import torch
import torch.nn.functional as F
from transformers import AutoConfig, DynamicCache

from testbed.engine.codec import DTYPES, Message
from testbed.engine.effects import Compute, Log, Recv, Send
from testbed.errors import ConfigError, ProtocolError

from . import wire
from parties.base import Protocol, is_eval_step, make_optimizer, party_name
from .lowrank import PROJECTIONS, CloudStack, DeviceEnds, SavedTensors, frozen_factors, projection_dims
from parties.models import DTYPES as MODEL_DTYPES
from parties.models import hf_config

CLOUD = wire.CLOUD


def causal_ce(logits, ids, reduction="mean"):
    """Next-token cross-entropy of ``logits`` [B,T,V] against ``ids`` [B,T]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           ids[:, 1:].reshape(-1), reduction=reduction)


class PrivateLoRA(Protocol):
    name = "privatelora"
    server_roles = (CLOUD,)
    lowrank = True      # False: the full-hidden split baseline (parties/privatelora/full.py)

    def __init__(self, ctx):
        super().__init__(ctx)
        sc = ctx.scenario
        # The shared checkpoint's config and dtype are public: both sides read them here.
        self.config = AutoConfig.from_pretrained(sc.model.path) if sc.model.path \
            else hf_config(sc.model, ctx.vocab_size)
        if self.config.model_type != "llama":
            raise ConfigError("model.family", [f"{self.name} needs a dense LLaMA model, model.family: "
                                               f"llama (got {self.config.model_type!r})"])
        self.opts = wire.parse_options(wire.family_options(ctx), sc)
        self.dtype = MODEL_DTYPES[sc.model.dtype]
        self.wdtype = DTYPES[self.opts.wire_dtype] if self.opts.wire_dtype else self.dtype
        self.devices = [party_name(i) for i in range(len(ctx.parties))]

    def expected_train_logs(self):
        return self.ctx.training.steps * len(self.devices)

    def roles(self):
        out = {dev: self.device(i) for i, dev in enumerate(self.devices)}
        out[CLOUD] = self.cloud()
        return out

    # -- shared helpers ----------------------------------------------------------------
    def _factors(self, config):
        # Same seed label in both splits, so privatelora and privatelora_full share A and B.
        return frozen_factors(config, self.opts.r_c2d, self.opts.r_d2c,
                              self.ctx.generator("adapters", "privatelora"), self.dtype)

    def _wire(self, tensors):
        return {k: t.detach().to(self.wdtype).contiguous() for k, t in tensors.items()}

    def _local(self, t, grad=False):
        return t.to(device=self.ctx.device, dtype=self.dtype).requires_grad_(grad)

    def _layer_msg(self, kind, mode, layer, party, step, phase, tensors):
        meta = wire.layer_meta(kind, self.lowrank, mode, layer, party, self.opts.r_c2d,
                               self.opts.r_d2c, phase)
        return Message(kind=kind, step=step, meta=meta, tensors=self._wire(tensors))

    def _pass_msg(self, kind, mode, party, step, start, phase, tensors):
        return Message(kind=kind, step=step, meta=wire.pass_meta(kind, mode, party, start, phase),
                       tensors=self._wire(tensors))

    @staticmethod
    def _expect(msg, who, layer=None, mode=None):
        if layer is not None and msg.meta.get("layer") != layer:
            raise ProtocolError(f"{who}: expected {msg.kind!r} for layer {layer} from {msg.src}, "
                                f"got layer {msg.meta.get('layer')!r}")
        if mode is not None and msg.meta.get("mode") != mode:
            raise ProtocolError(f"{who}: expected a {mode!r} pass from {msg.src}, "
                                f"got {msg.meta.get('mode')!r}")

    def _kv_bytes(self, kv_len):
        c = self.config
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return 2 * kv_len * c.num_key_value_heads * hd * torch.empty((), dtype=self.dtype).element_size()

    def summary_record(self):
        """The ``privatelora`` metrics record: per-token wire payload vs the full-hidden split."""
        c, o = self.config, self.opts
        b = torch.empty((), dtype=self.wdtype).element_size()
        dims = projection_dims(c)
        low = len(PROJECTIONS) * (o.r_c2d + o.r_d2c) * b
        full = (c.hidden_size + sum(dims.values())) * b
        return {"event": "privatelora", "role": CLOUD, "split": "lowrank" if self.lowrank else "full",
                "r_c2d": o.r_c2d, "r_d2c": o.r_d2c, "layers": c.num_hidden_layers,
                "hidden_size": c.hidden_size, "wire_dtype": str(self.wdtype).removeprefix("torch."),
                "payload_bytes_per_token_per_layer": {"privatelora": low, "full_hidden": full},
                "reduction_vs_full_hidden": full / low,
                "trainable_params_per_device": len(PROJECTIONS) * c.num_hidden_layers * o.r_c2d * o.r_d2c}

    # -- cloud -------------------------------------------------------------------------
    def cloud(self):
        ctx, tr, o = self.ctx, self.ctx.training, self.opts
        model = ctx.build_model()
        factors = self._factors(model.config) if self.lowrank else None
        stack = CloudStack(model, factors).to(ctx.device)
        mem = ctx.tracker(CLOUD)
        mem.attach([stack])
        yield Log(self.summary_record())
        if o.eval_base:
            for dev in self.devices:
                yield from self._serve_eval(stack, mem, dev, -1)
        for step in range(tr.steps):
            for dev in self.devices:
                yield from self._serve_train(stack, mem, dev, step)
                if is_eval_step(step, tr):
                    yield from self._serve_eval(stack, mem, dev, step)
        for dev in self.devices:
            if o.generate_tokens:
                cache = DynamicCache(config=stack.config)   # per-device state, this sample only
                for _ in range(o.generate_tokens):
                    yield from self._serve_forward(stack, mem, dev, tr.steps, "generate", False, cache)
                mem.add_activations(self._kv_bytes(cache.get_seq_length()) * stack.config.num_hidden_layers)

    def _serve_forward(self, stack, mem, dev, step, mode, grad, cache=None):
        """One pass for ``dev``, layer by layer.  Returns (final hidden, its leaf, per-layer state)."""
        msg = yield Recv(src=dev, kind=wire.EMBED)
        self._expect(msg, CLOUD, mode=mode)
        start = msg.meta["position"]
        h = self._local(msg.tensors["embeddings"])
        ctx = stack.context(h, cache, start)
        saved, layers = SavedTensors([stack]), []
        traffic = self.opts.weight_traffic and mode == "generate"
        for layer in range(self.config.num_hidden_layers):
            with torch.set_grad_enabled(grad), saved.segment():
                h_in = h.detach().requires_grad_() if grad and layer > 0 else h
                x, down = stack.down(layer, h_in)
            yield Send(dev, self._layer_msg(wire.ACT_DOWN, mode, layer, dev, step, "fwd", down))
            reply = yield Recv(src=dev, kind=wire.ACT_UP)
            self._expect(reply, CLOUD, layer=layer)
            incoming = {p: self._local(reply.tensors[p], grad) for p in PROJECTIONS}
            with torch.set_grad_enabled(grad), saved.segment():
                h = stack.attend(layer, h_in, x, incoming, ctx, cache)
            if grad:
                layers.append((h_in, down, incoming, h))
            if traffic:
                yield Compute(bytes=stack.layer_bytes(layer) + self._kv_bytes(start + h.shape[1]))
        with torch.set_grad_enabled(grad), saved.segment():
            last = h.detach().requires_grad_() if grad else h
            out = stack.norm(last)
        if traffic:
            yield Compute(bytes=stack.norm_bytes())
        sent = out[:, -1:] if mode == "generate" else out
        yield Send(dev, self._pass_msg(wire.HIDDEN, mode, dev, step, start, "fwd", {"hidden": sent}))
        mem.add_activations(saved.total())
        return out, last, layers

    def _serve_train(self, stack, mem, dev, step):
        out, last, layers = yield from self._serve_forward(stack, mem, dev, step, "train", True)
        msg = yield Recv(src=dev, kind=wire.GRAD_HIDDEN)
        torch.autograd.backward(out, self._local(msg.tensors["grad"]))
        grad_h = last.grad
        for layer in reversed(range(len(layers))):
            h_in, down, incoming, h_out = layers[layer]
            inputs = list(incoming.values()) + ([h_in] if layer > 0 else [])
            # retain: the normed input x also feeds A·x, whose gradient arrives next
            torch.autograd.backward(h_out, grad_h, inputs=inputs, retain_graph=layer > 0)
            yield Send(dev, self._layer_msg(wire.GRAD_DOWN, "train", layer, dev, step, "bwd",
                                            {p: incoming[p].grad for p in PROJECTIONS}))
            if layer > 0:
                reply = yield Recv(src=dev, kind=wire.GRAD_UP)
                self._expect(reply, CLOUD, layer=layer)
                names = list(down)
                torch.autograd.backward([down[n] for n in names],
                                        [self._local(reply.tensors[n]) for n in names], inputs=[h_in])
                grad_h = h_in.grad
            layers[layer] = None

    def _serve_eval(self, stack, mem, dev, step):
        for _ in range(self.ctx.training.eval_batches):
            yield from self._serve_forward(stack, mem, dev, step, "eval", False)

    # -- device ------------------------------------------------------------------------
    def device(self, i):
        ctx, tr, o, me = self.ctx, self.ctx.training, self.opts, party_name(i)
        model = ctx.build_model()
        ends = DeviceEnds(model, o.r_c2d, o.r_d2c,
                          None if self.lowrank else self._factors(model.config)).to(ctx.device)
        opt = make_optimizer(ends.M.parameters(), tr)
        mem = ctx.tracker(me)
        mem.attach([ends], [opt])
        gen, data = ctx.generator(me), ctx.parties[i]
        if o.eval_base:
            yield from self._device_eval(ends, i, -1)
        for step in range(tr.steps):
            ids = data.sample(tr.batch_size, gen).to(ctx.device)
            ctx.record_truth(me, step, ids)
            loss = yield from self._device_train(ends, opt, mem, me, step, ids)
            yield Log({"event": "train", "role": me, "party": me, "step": step, "loss": loss,
                       "tokens": ids.numel()})
            if is_eval_step(step, tr):
                yield from self._device_eval(ends, i, step)
        if o.generate_tokens:
            yield from self._device_generate(ends, i)

    def _device_forward(self, ends, me, step, ids, mode, grad, start=0):
        """Embeddings up, one M per layer, final hidden down.  Returns (hidden, buffers, saved)."""
        with torch.no_grad():
            emb = ends.embed(ids)
        yield Send(CLOUD, self._pass_msg(wire.EMBED, mode, me, step, start, "fwd", {"embeddings": emb}))
        saved, bufs = SavedTensors([ends]), []
        for layer in range(self.config.num_hidden_layers):
            msg = yield Recv(src=CLOUD, kind=wire.ACT_DOWN)
            self._expect(msg, me, layer=layer)
            # layer 0's input gradient would only reach the frozen embeddings
            received = {k: self._local(t, grad and layer > 0) for k, t in msg.tensors.items()}
            with torch.set_grad_enabled(grad), saved.segment():
                out = ends.adapt(layer, received)
            yield Send(CLOUD, self._layer_msg(wire.ACT_UP, mode, layer, me, step, "fwd", out))
            if grad:
                saved.add(*received.values())
                bufs.append((received, out))
        msg = yield Recv(src=CLOUD, kind=wire.HIDDEN)
        return self._local(msg.tensors["hidden"], grad), bufs, saved

    def _device_train(self, ends, opt, mem, me, step, ids):
        h, bufs, saved = yield from self._device_forward(ends, me, step, ids, "train", True)
        with saved.segment():
            loss = causal_ce(ends.head(h), ids)
        loss.backward()
        mem.add_activations(saved.total())
        yield Send(CLOUD, self._pass_msg(wire.GRAD_HIDDEN, "train", me, step, 0, "bwd", {"grad": h.grad}))
        for layer in reversed(range(len(bufs))):
            msg = yield Recv(src=CLOUD, kind=wire.GRAD_DOWN)
            self._expect(msg, me, layer=layer)
            received, out = bufs[layer]
            torch.autograd.backward([out[p] for p in PROJECTIONS],
                                    [self._local(msg.tensors[p]) for p in PROJECTIONS])
            if layer > 0:
                yield Send(CLOUD, self._layer_msg(wire.GRAD_UP, "train", layer, me, step, "bwd",
                                                  {k: t.grad for k, t in received.items()}))
            bufs[layer] = None
        opt.step()
        mem.update_state()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def _device_eval(self, ends, i, step):
        tr, me = self.ctx.training, party_name(i)
        batches = self.ctx.parties[i].eval_batches(tr.batch_size, tr.eval_batches)
        if len(batches) != tr.eval_batches:   # the cloud serves exactly eval_batches passes
            raise ProtocolError(f"{me}: {len(batches)} eval batches, the cloud expects {tr.eval_batches}")
        total, n = 0.0, 0
        for ids in batches:
            ids = ids.to(self.ctx.device)
            h, _, _ = yield from self._device_forward(ends, me, step, ids, "eval", False)
            with torch.no_grad():
                total += causal_ce(ends.head(h), ids, reduction="sum").item()
            n += ids[:, 1:].numel()
        yield Log({"event": "eval", "role": me, "party": me, "step": step, "eval_loss": total / n})

    def _device_generate(self, ends, i):
        """Greedy generation of ``generate_tokens`` tokens from the first held-out prompt."""
        o, me, step = self.opts, party_name(i), self.ctx.training.steps
        prompt = self.ctx.parties[i].eval[:1, :o.prompt_len].to(self.ctx.device)
        yield Log({"event": "generate_start", "role": me, "party": me, "step": step})
        ids, start, out = prompt, 0, []
        for _ in range(o.generate_tokens):
            h, _, _ = yield from self._device_forward(ends, me, step, ids, "generate", False, start)
            with torch.no_grad():
                tok = ends.head(h[:, -1]).argmax(-1)
            if o.weight_traffic:
                yield Compute(bytes=ends.pass_bytes(ids.shape[1]))
            out.append(int(tok.item()))
            start, ids = start + ids.shape[1], tok.view(1, 1)
        yield Log({"event": "generate", "role": me, "party": me, "step": step,
                   "prompt_ids": prompt[0].tolist(), "generated_ids": out,
                   "prompt_len": o.prompt_len, "tokens": o.generate_tokens})
