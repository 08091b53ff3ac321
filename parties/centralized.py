"""``centralized``: one site holds every party's data and the whole model.

The quality upper bound (and the privacy floor: nothing crosses a wire because all
data was handed to one place).  Each step trains on one batch drawn from the union of
the parties' training sets; evaluation reports the loss on every party's held-out set.
"""
import torch

from .base import Protocol, make_optimizer, single_site_loop


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
        gen = ctx.generator("site")
        pool = torch.cat([p.train for p in ctx.parties])
        yield from single_site_loop(
            ctx, "site", model, make_optimizer(model.parameters(), tr),
            lambda: pool[torch.randint(len(pool), (tr.batch_size,), generator=gen)])


PROTOCOL = Centralized
