"""LoRA baselines for PrivateLoRA: ``lora``, ``device_only`` and ``cloud_only`` (via ``peft``).

Each trains ordinary LoRA (Hu et al., arXiv 2106.09685) with the ``peft`` package on
``q_proj``, ``k_proj`` and ``v_proj`` of every layer -- the sites PrivateLoRA adapts --
with rank ``r_c2d`` of the PrivateLoRA options and ``lora_alpha`` (default 2 × rank);
the base model is the scenario's shared checkpoint, frozen.

* ``lora``: one ``site`` holds every device's training data and the whole model and
  trains one adapter on the pooled rows -- PrivateLoRA's quality reference; nothing
  crosses a wire.
* ``device_only``: each device trains its own adapter on its own shard, alone, on the
  *same* model (chosen over a smaller local model so that quality stays comparable):
  its memory record shows what a device must hold without a cloud -- every layer.
* ``cloud_only``: each device uploads its held-out rows once and its raw training
  batches (token ids) every step; the ``cloud`` trains one adapter per device (peft
  multi-adapter) round-robin.  The privacy floor: the capture holds the private text.

With ``eval_base`` (default) every baseline also logs the frozen base's held-out loss
at step -1.  As baselines of a PrivateLoRA scenario they read its ``protocol.options``.
"""
import warnings

from peft import LoraConfig, get_peft_model

from testbed.engine.codec import Message
from testbed.engine.effects import Log, Recv, Send

from parties.base import (Protocol, eval_loss, is_eval_step, make_optimizer, party_name, pooled_sampler,
                   single_site_loop,
                   train_step)
from .wire import family_options, parse_options

TARGETS = ["q_proj", "k_proj", "v_proj"]


def lora_config(opts):
    return LoraConfig(r=opts.r_c2d, lora_alpha=opts.lora_alpha or 2 * opts.r_c2d,
                      target_modules=TARGETS, lora_dropout=0.0, bias="none")


class _LoraBase(Protocol):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.opts = parse_options(family_options(ctx), ctx.scenario)

    def _peft_model(self, adapter="default"):
        model = self.ctx.build_model().to(self.ctx.device)
        with warnings.catch_warnings():   # peft probes a transformers API deprecated in 5.x
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, lora_config(self.opts), adapter_name=adapter)


class Lora(_LoraBase):
    """``lora``: one site, all devices' data, one adapter."""

    name = "lora"
    server_roles = ("site",)

    def role_names(self):
        return ["site"]

    def roles(self):
        return {"site": self.site()}

    def site(self):
        ctx, tr = self.ctx, self.ctx.training
        model = self._peft_model()
        yield from single_site_loop(
            ctx, "site", model, make_optimizer(model.parameters(), tr),
            pooled_sampler(ctx, ctx.generator("site")),
            eval_base=self.opts.eval_base)


class DeviceOnly(_LoraBase):
    """``device_only``: every device fine-tunes LoRA on the whole model, alone."""

    name = "device_only"

    def expected_train_logs(self):
        return self.ctx.training.steps * len(self.ctx.parties)

    def roles(self):
        return {party_name(i): self.device(i) for i in range(len(self.ctx.parties))}

    def device(self, i):
        ctx, tr, me = self.ctx, self.ctx.training, party_name(i)
        model = self._peft_model()
        gen, data = ctx.generator(me), ctx.parties[i]
        yield from single_site_loop(
            ctx, me, model, make_optimizer(model.parameters(), tr),
            lambda: data.sample(tr.batch_size, gen), eval_parties=[i], truth_party=me,
            eval_base=self.opts.eval_base)


class CloudOnly(_LoraBase):
    """``cloud_only``: devices send raw token ids; the cloud trains one adapter per device."""

    name = "cloud_only"
    server_roles = ("cloud",)

    def expected_train_logs(self):
        return self.ctx.training.steps * len(self.ctx.parties)

    def roles(self):
        out = {party_name(i): self.device(i) for i in range(len(self.ctx.parties))}
        out["cloud"] = self.cloud()
        return out

    def device(self, i):
        ctx, tr, me = self.ctx, self.ctx.training, party_name(i)
        data, gen = ctx.parties[i], ctx.generator(me)
        rows = data.eval[: tr.batch_size * tr.eval_batches]
        yield Send("cloud", Message(kind="eval_data", step=-1, meta={"party": me, "direction": "d2c"},
                                    tensors={"input_ids": rows}))
        for step in range(tr.steps):
            ids = data.sample(tr.batch_size, gen)
            ctx.record_truth(me, step, ids)
            yield Send("cloud", Message(kind="data", step=step, meta={"party": me, "direction": "d2c"},
                                        tensors={"input_ids": ids}))

    def cloud(self):
        ctx, tr = self.ctx, self.ctx.training
        names = [party_name(i) for i in range(len(ctx.parties))]
        adapters = {dev: dev.replace("-", "_") for dev in names}
        model = self._peft_model(adapters[names[0]])
        for dev in names[1:]:
            model.add_adapter(adapters[dev], lora_config(self.opts))
        opts = {}
        for dev in names:   # set_adapter makes exactly that adapter trainable
            model.set_adapter(adapters[dev])
            opts[dev] = make_optimizer([p for n, p in model.named_parameters() if f".{adapters[dev]}." in n], tr)
        mem = ctx.tracker("cloud")
        mem.attach([model], list(opts.values()))
        evals = {}
        for dev in names:
            msg = yield Recv(src=dev, kind="eval_data")
            rows = msg.tensors["input_ids"].to(ctx.device)
            evals[dev] = [rows[j:j + tr.batch_size] for j in range(0, len(rows), tr.batch_size)]
        for step in range(-1 if self.opts.eval_base else 0, tr.steps):
            for dev in names:
                model.set_adapter(adapters[dev])
                if step >= 0:
                    msg = yield Recv(src=dev, kind="data")
                    ids = msg.tensors["input_ids"].to(ctx.device)
                    loss = train_step(model, opts[dev], mem, ids)
                    yield Log({"event": "train", "role": "cloud", "party": dev, "step": step,
                               "loss": loss, "tokens": ids.numel()})
                if step < 0 or is_eval_step(step, tr):
                    yield Log({"event": "eval", "role": "cloud", "party": dev, "step": step,
                               "eval_loss": eval_loss(model, evals[dev])})
