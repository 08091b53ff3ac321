"""``fedavg``: federated averaging -- local steps, then the weight deltas are averaged.

FedAvg (McMahan et al. 2017, https://arxiv.org/abs/1602.05629).  Each round (= one
training step) a selected party takes ``local_steps`` optimizer steps (option, default 2)
on private mini-batches, starting from the current global weights, and sends its weight
delta ``w_local - w_global`` to the ``coordinator`` (kind ``delta``; one tensor per
parameter; meta ``party``, ``round``, ``n_samples`` = the party's training rows, i.e.
FedAvg's n_k, ``local_steps``).  The coordinator broadcasts the n_k-weighted mean delta
(kind ``update``) and every party sets ``w_global + mean delta``.

A party's optimizer state (e.g. AdamW moments) persists across the rounds it is selected
in.  Its train record's ``loss`` is the mean over the round's local steps.  Under DP-SGD
every local step is a DP-SGD step and the accountant counts all of them.

Options: ``local_steps`` (>= 1, default 2), ``clients_per_round`` ('all' or 1..parties),
``average`` (default true).  ``average: false`` is the ablation (also registered as
``fedavg_no_avg``): the same rounds and traffic, but a party ignores the broadcast
average and keeps its own weights, so nothing learned elsewhere reaches it.

    python -m testbed run scenarios/fedavg-4party.yaml
"""
import torch

from parties.base import lm_loss
from .rounds import Federated, check_clients


def check_bool(v, _n):
    return None if isinstance(v, bool) else "must be true or false"


def check_local_steps(v, _n):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        return "must be an integer >= 1"
    return None


class FedAvg(Federated):
    name = "fedavg"
    up_kind = "delta"
    payload = "mean_delta"
    OPTIONS = {"clients_per_round": (check_clients, "all"), "local_steps": (check_local_steps, 2),
               "average": (check_bool, True)}

    def batches_per_round(self):
        return self.opts["local_steps"]

    def local_update(self, state, t):
        ctx, tr, me = self.ctx, self.ctx.training, state["me"]
        model, opt, mem, private = state["model"], state["opt"], state["mem"], state["private"]
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        state["start"] = start
        batches, losses = [], []
        for _ in range(self.opts["local_steps"]):
            ids = state["data"].sample(tr.batch_size, state["gen"]).to(ctx.device)
            batches.append(ids)
            with mem.activations_scope():
                loss = lm_loss(model, ids)
            loss.backward()
            (private or opt).step()
            mem.update_state()
            (private.zero_grad() if private else opt.zero_grad(set_to_none=True))
            losses.append(loss.item())
        mem.add_activations(sum(v.numel() * v.element_size() for v in start.values()))
        ids = torch.cat(batches)
        ctx.record_truth(me, t, ids)
        with torch.no_grad():
            delta = {n: (p - start[n]).detach() for n, p in model.named_parameters() if p.requires_grad}
        meta = {"n_samples": len(state["data"].train), "local_steps": self.opts["local_steps"],
                "tokens": ids.numel()}
        return delta, meta, {"loss": sum(losses) / len(losses), "tokens": ids.numel()}

    @torch.no_grad()
    def apply_update(self, state, tensors):
        start = state.pop("start", None)
        if not self.opts["average"]:
            return                  # the ablation: the party keeps its own weights
        for n, p in state["model"].named_parameters():
            if n not in tensors:
                continue
            base = start[n] if start is not None else p
            p.copy_(base + tensors[n].to(p.device, p.dtype))


class FedAvgNoAverage(FedAvg):
    """``fedavg_no_avg``: FedAvg with ``average: false`` (as a baseline of a FedAvg
    scenario: the scenario's FedAvg options with that one changed)."""

    name = "fedavg_no_avg"

    def given_options(self, ctx):
        sc = ctx.scenario
        base = sc.protocol.options if sc.protocol.name in ("fedavg", self.name) else ctx.options
        return {**base, "average": False}
