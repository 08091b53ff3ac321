"""``centralized``: one site holds every party's data and the whole model.

The quality upper bound (and the privacy floor: nothing crosses a wire because all
data was handed to one place).  Each step trains on one batch drawn from the union of
the parties' training sets; evaluation reports the loss on every party's held-out set.
"""

from parties.base import Protocol, make_optimizer, pooled_sampler, single_site_loop


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
        yield from single_site_loop(
            ctx, "site", model, make_optimizer(model.parameters(), tr),
            pooled_sampler(ctx, ctx.generator("site")))
