"""What every protocol is built from: the role context and the Protocol base class.

A protocol turns a :class:`RoleContext` into named roles (``party-0``, ``coordinator``,
``cloud``, ...), each a generator that yields effects from :mod:`testbed.engine.effects`.
Protocols never import an engine: the same roles run on the SimPy clock and in
containers.
"""
import zlib
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from testbed.engine.effects import Log


def party_name(i):
    return f"party-{i}"


@dataclass
class RoleContext:
    """Everything a protocol may use. Built by the runner; nothing here is an engine."""

    scenario: object                    # testbed.scenario.Scenario
    vocab_size: int
    parties: list                       # parties.data.dataset.PartyData, index i is party-i
    device: torch.device
    build_model: Callable               # () -> fresh model from the shared starting checkpoint
    trackers: dict = field(default_factory=dict)   # role -> testbed.engine.memory.MemoryTracker
    record_truth: Callable = lambda party, step, ids: None
    # record_route(party=, step=, layer=, host=, positions=[[row, pos], ...]): which token of
    # the party's batch each row of a routed message carries (PC-MoE; scoring only)
    record_route: Callable = lambda **route: None
    protocol_name: str = ""

    @property
    def training(self):
        return self.scenario.training

    @property
    def options(self):
        return self.scenario.protocol.options if self.protocol_name == self.scenario.protocol.name else {}

    def generator(self, role, purpose="data"):
        """A torch.Generator seeded from (scenario seed, role, purpose): no global RNG state."""
        g = torch.Generator()
        g.manual_seed(self.scenario.seed * 1_000_003 + zlib.crc32(f"{role}/{purpose}".encode()))
        return g

    def tracker(self, role):
        return self.trackers[role]


class Protocol:
    """Base class. Subclasses set ``name`` and implement :meth:`roles`."""

    name = ""
    # role names this protocol uses besides the parties (they run on the coordinator's host)
    server_roles = ()

    def __init__(self, ctx):
        self.ctx = ctx

    def roles(self):
        """-> dict role name -> generator of effects."""
        raise NotImplementedError

    def expected_train_logs(self):
        """How many ``event: train`` records the roles will log (for the progress bar)."""
        return self.ctx.training.steps

    def role_names(self):
        return [party_name(i) for i in range(len(self.ctx.parties))] + list(self.server_roles)

    def party_batches(self, i):
        """How many training mini-batches (of ``training.batch_size`` rows) party ``i``'s
        data feeds in this protocol: what a token-matched baseline gives the party."""
        return self.ctx.training.steps


def main_protocol(ctx):
    """The scenario's protocol under study, built on a copy of ``ctx`` (so it reads its
    own ``protocol.options``): what matched baselines measure themselves against."""
    from parties.registry import get_protocol   # the registry imports protocols lazily
    name = ctx.scenario.protocol.name
    return get_protocol(name)(replace(ctx, protocol_name=name))


def make_optimizer(params, training):
    params = [p for p in params if p.requires_grad]
    if training.optimizer == "sgd":
        return torch.optim.SGD(params, lr=training.lr, weight_decay=training.weight_decay)
    if training.optimizer == "adam":
        return torch.optim.Adam(params, lr=training.lr, weight_decay=training.weight_decay)
    return torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)


def lm_loss(model, input_ids):
    """Causal LM loss (plus the router's auxiliary loss for MoE models)."""
    return model(input_ids=input_ids, labels=input_ids).loss


@torch.no_grad()
def eval_loss(model, batches):
    """Mean token cross-entropy of ``model`` over held-out batches (no aux loss)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for ids in batches:
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        n += ids[:, 1:].numel()
    model.train(was)
    return total / max(n, 1)


def eval_records(ctx, model, role, step, parties=None):
    """Log records of ``model``'s held-out loss on each party's eval set."""
    out = []
    for i in parties if parties is not None else range(len(ctx.parties)):
        pd = ctx.parties[i]
        loss = eval_loss(model, pd.eval_batches(ctx.training.batch_size, ctx.training.eval_batches))
        out.append(Log({"event": "eval", "role": role, "party": party_name(i), "step": step,
                        "eval_loss": loss}))
    return out


def is_eval_step(step, training):
    return (step + 1) % training.eval_every == 0 or step + 1 == training.steps


def train_step(model, opt, mem, ids):
    """One optimizer step on ``ids`` with memory accounting; returns the loss."""
    with mem.activations_scope():
        loss = lm_loss(model, ids)
    loss.backward()
    opt.step()
    mem.update_state()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def pooled_sampler(ctx, gen):
    """-> sample(): the next batch of an epoch stream (without replacement, drawn with
    ``gen``) over every party's training rows pooled (a site that holds all the data:
    centralized training, pooled LoRA)."""
    from parties.data.canaries import CanaryRows
    from parties.data.dataset import EpochSampler
    sampler = EpochSampler(torch.cat([p.train for p in ctx.parties]), gen)
    size = ctx.training.batch_size
    planted = [p.planted.rows for p in ctx.parties if getattr(p, "planted", None) is not None]
    if not planted:
        return lambda: sampler(size)
    # the site holds every party's text, canaries included: they open its first batches too
    rows = CanaryRows(torch.cat(planted), size)
    return lambda: rows.apply(sampler(size), gen)


def single_site_loop(ctx, role, model, opt, sample, eval_parties=None, truth_party=None,
                     eval_base=False, steps=None):
    """Generator: the plain training loop of a protocol that trains on one site.

    ``sample()`` returns the next batch of token ids; ``truth_party`` (when the batch is one
    party's private data) gets a truth record per step; evaluation is on ``eval_parties``
    (default: every party), also before training when ``eval_base``.  ``steps`` (default
    ``training.steps``): fewer or more steps, evaluated as often relative to the run
    (``eval_every`` scaled by ``steps / training.steps``) and at the last step."""
    tr, mem = ctx.training, ctx.tracker(role)
    mem.attach([model], [opt])
    party = truth_party or role
    if eval_base:
        yield from eval_records(ctx, model, role, -1, parties=eval_parties)
    if steps is not None and steps != tr.steps:
        every = max(1, round(tr.eval_every * steps / tr.steps))
        tr = tr.model_copy(update={"steps": steps, "eval_every": every})
    for step in range(tr.steps):
        ids = sample().to(ctx.device)
        if truth_party:
            ctx.record_truth(truth_party, step, ids)
        loss = train_step(model, opt, mem, ids)
        yield Log({"event": "train", "role": role, "party": party, "step": step, "loss": loss,
                   "tokens": ids.numel()})
        if is_eval_step(step, tr):
            yield from eval_records(ctx, model, role, step, parties=eval_parties)
