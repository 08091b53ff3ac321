"""``local``: every party trains its own copy of the model on its own shard, alone.

The quality lower bound: no collaboration, nothing on the wire.  Each party runs
``training.steps`` steps on its own data and is evaluated on its own held-out set.
"""
from parties.base import Protocol, make_optimizer, party_name, single_site_loop


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
        gen, data = ctx.generator(me), ctx.parties[i]
        yield from single_site_loop(
            ctx, me, model, make_optimizer(model.parameters(), tr),
            lambda: data.sample(tr.batch_size, gen), eval_parties=[i], truth_party=me)
