"""Baselines named for what they match: a party alone with the same tokens (and memory).

* ``local_token_matched`` -- each party trains its own copy alone on as many mini-batches
  of its own data as the protocol under study (the scenario's ``protocol``) feeds from it
  (:meth:`parties.base.Protocol.party_batches`; PC-MoE: its turns of the schedule,
  FedAvg: ``local_steps`` per round it is selected in).  Plain ``local`` trains
  ``training.steps`` per party, which is n times the tokens a PC-MoE party gets.
* ``local_memory_matched`` -- the same, within the memory PC-MoE gives a party: its
  backbone and only the ``m/n`` experts it hosts (round-robin, as in
  :mod:`parties.pcmoe.sharding`) with the router restricted to them and
  ``top_k = min(top_k, m/n)``.  The question PC-MoE answers is whether parties
  "collectively train more capable LLMs than they could achieve individually"
  (arXiv 2506.02965): this is what one of them achieves individually.

Both evaluate as often relative to their run as the protocol under study does.
"""
import copy

import torch

from parties.base import main_protocol, make_optimizer, party_name, single_site_loop

from .local import Local

MATCHED = ("local_token_matched", "local_memory_matched")


def matched_batches(ctx, i):
    """Mini-batches of party ``i`` the protocol under study trains on (``training.steps``
    when the scenario's protocol is itself a single-site baseline)."""
    if ctx.scenario.protocol.name in MATCHED + ("local", "centralized"):
        return ctx.training.steps
    return main_protocol(ctx).party_batches(i)


def restrict_experts(model, hosted):
    """A new model of the same family whose MoE layers hold only the experts ``hosted``
    (global indices): router rows and expert weights sliced, everything else copied."""
    cfg = copy.deepcopy(model.config)
    k = len(hosted)
    key = "num_local_experts" if hasattr(cfg, "num_local_experts") else "num_experts"
    n_experts = getattr(cfg, key)
    setattr(cfg, key, k)
    cfg.num_experts_per_tok = min(cfg.num_experts_per_tok, k)
    small = type(model)(cfg).to(dtype=model.dtype)
    idx = torch.tensor(hosted, dtype=torch.long)
    state = {}
    for name, t in model.state_dict().items():
        sliced = (".mlp.gate." in name or ".mlp.experts." in name) and t.dim() >= 1 \
            and t.shape[0] == n_experts
        state[name] = t[idx].clone() if sliced else t
    small.load_state_dict(state, strict=True)
    return small


class LocalTokenMatched(Local):
    name = "local_token_matched"

    def expected_train_logs(self):
        return sum(self.party_batches(i) for i in range(len(self.ctx.parties)))

    def party_batches(self, i):
        return matched_batches(self.ctx, i)

    def make_model(self, i):
        return self.ctx.build_model()

    def party(self, i):
        ctx, tr, me = self.ctx, self.ctx.training, party_name(i)
        model = self.make_model(i).to(ctx.device)
        model.train()
        gen, data = ctx.generator(me), ctx.parties[i]
        yield from single_site_loop(
            ctx, me, model, make_optimizer(model.parameters(), tr),
            lambda: data.sample(tr.batch_size, gen), eval_parties=[i], truth_party=me,
            steps=self.party_batches(i))


class LocalMemoryMatched(LocalTokenMatched):
    name = "local_memory_matched"

    def make_model(self, i):
        from parties.pcmoe.sharding import hosted_experts
        model = self.ctx.build_model()
        cfg = model.config
        n_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
        if not n_experts:
            from testbed.errors import ConfigError
            raise ConfigError("model.family", [f"{self.name} needs a mixture-of-experts model "
                                               f"(got {cfg.model_type!r}); valid: mixtral, olmoe, qwen2_moe"])
        hosted = hosted_experts(n_experts, i, len(self.ctx.parties))
        if not hosted:
            from testbed.errors import ConfigError
            raise ConfigError("parties.count", [f"{self.name}: party-{i} hosts no expert "
                                                f"({len(self.ctx.parties)} parties, {n_experts} experts)"])
        return restrict_experts(model, hosted)
