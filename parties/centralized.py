"""``centralized``: one site holds every party's data and the whole model.

The quality upper bound (and the privacy floor: nothing crosses a wire because all
data was handed to one place).  Each step trains on one batch drawn from the union of
the parties' training sets; evaluation reports the loss on every party's held-out set.
"""
import torch

from testbed.effects import Log

from .base import Protocol, eval_records, is_eval_step, lm_loss, make_optimizer


class Centralized(Protocol):
    name = "centralized"
    server_roles = ("site",)

    def role_names(self):
        return ["site"]

    def roles(self):
        return {"site": self.site()}

    def site(self):
        ctx, tr = self.ctx, self.ctx.training
        model = ctx.build_model().to(ctx.device)
        model.train()
        opt = make_optimizer(model.parameters(), tr)
        mem = ctx.tracker("site")
        mem.attach([model], [opt])
        gen = ctx.generator("site")
        pool = torch.cat([p.train for p in ctx.parties])
        for step in range(tr.steps):
            idx = torch.randint(len(pool), (tr.batch_size,), generator=gen)
            ids = pool[idx].to(ctx.device)
            with mem.activations_scope():
                loss = lm_loss(model, ids)
            loss.backward()
            opt.step()
            mem.update_state()
            opt.zero_grad(set_to_none=True)
            yield Log({"event": "train", "role": "site", "party": "site", "step": step,
                       "loss": loss.item(), "tokens": ids.numel()})
            if is_eval_step(step, tr):
                yield from eval_records(ctx, model, "site", step)


PROTOCOL = Centralized
