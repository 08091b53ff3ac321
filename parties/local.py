"""``local``: every party trains its own copy of the model on its own shard, alone.

The quality lower bound: no collaboration, nothing on the wire.  Each party runs
``training.steps`` steps on its own data and is evaluated on its own held-out set.
"""
from testbed.effects import Log

from .base import Protocol, eval_records, is_eval_step, lm_loss, make_optimizer, party_name


class Local(Protocol):
    name = "local"

    def expected_train_logs(self):
        return self.ctx.training.steps * len(self.ctx.parties)

    def roles(self):
        return {party_name(i): self.party(i) for i in range(len(self.ctx.parties))}

    def party(self, i):
        ctx, tr, me = self.ctx, self.ctx.training, party_name(i)
        model = ctx.build_model().to(ctx.device)
        model.train()
        opt = make_optimizer(model.parameters(), tr)
        mem = ctx.tracker(me)
        mem.attach([model], [opt])
        gen = ctx.generator(me)
        data = ctx.parties[i]
        for step in range(tr.steps):
            ids = data.sample(tr.batch_size, gen).to(ctx.device)
            ctx.record_truth(me, step, ids)
            with mem.activations_scope():
                loss = lm_loss(model, ids)
            loss.backward()
            opt.step()
            mem.update_state()
            opt.zero_grad(set_to_none=True)
            yield Log({"event": "train", "role": me, "party": me, "step": step,
                       "loss": loss.item(), "tokens": ids.numel()})
            if is_eval_step(step, tr):
                yield from eval_records(ctx, model, me, step, parties=[i])


PROTOCOL = Local
