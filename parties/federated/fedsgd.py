"""``fedsgd``: federated SGD -- every round each selected party sends one mini-batch gradient.

FedSGD (McMahan et al. 2017, https://arxiv.org/abs/1602.05629, with a mini-batch per
party instead of the full local set).  Each round (= one training step) a selected party
computes the gradient of the LM loss on one private mini-batch of ``training.batch_size``
rows and sends it to the ``coordinator`` (kind ``grad``; one tensor per parameter, named
as in ``model.named_parameters()``; meta ``party``, ``round``, ``n_samples`` = batch rows,
``tokens``).  The coordinator broadcasts the sample-weighted mean *gradient* (kind
``update``), and every party puts it in ``p.grad`` and takes the same optimizer step
(``training.optimizer``), so every copy stays equal -- with one party, full batches and
plain SGD this is centralized SGD step for step (tests/test_federated.py).

Under DP-SGD (``defences: [{type: dp_sgd, ...}]``) the sent gradient is the clipped,
noised mean of per-sample gradients (parties/federated/dp.py), and the averaged update is applied
without further clipping.  The gradient of one short batch is what DAGER-style attacks
invert exactly when batch x seq_len < hidden size (scenarios/fedsgd-tiny.yaml).

    python -m testbed run scenarios/fedsgd-4party.yaml
"""
import torch

from parties.base import lm_loss
from .rounds import Federated


class FedSGD(Federated):
    name = "fedsgd"
    up_kind = "grad"
    payload = "mean_gradient"

    def local_update(self, state, t):
        ctx, me, model, mem = self.ctx, state["me"], state["model"], state["mem"]
        ids = state["data"].sample(ctx.training.batch_size, state["gen"]).to(ctx.device)
        ctx.record_truth(me, t, ids)
        with mem.activations_scope():
            loss = lm_loss(model, ids)
        loss.backward()
        if state["private"] is not None:
            state["private"].privatize()
        mem.update_state()
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
                 for n, p in model.named_parameters() if p.requires_grad}
        self._zero(state)
        return grads, {"n_samples": ids.shape[0], "tokens": ids.numel()}, \
            {"loss": loss.item(), "tokens": ids.numel()}

    def apply_update(self, state, tensors):
        for n, p in state["model"].named_parameters():
            if p.requires_grad:
                p.grad = tensors[n].to(p.device, p.dtype)
        if state["private"] is not None:
            state["private"].apply()
        else:
            state["opt"].step()
        self._zero(state)

    @staticmethod
    def _zero(state):
        if state["private"] is not None:
            state["private"].zero_grad()
        else:
            state["opt"].zero_grad(set_to_none=True)
