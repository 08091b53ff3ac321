"""Bag of tokens from the embedding gradient, and the gradient plumbing the other
gradient-inversion attacks share.

Threat model: an honest-but-curious aggregator (FedSGD coordinator, or anyone on the
wire) sees one party's gradient of the LM loss for one batch.  The embedding layer is a
lookup, so the gradient of the input embedding matrix is nonzero exactly in the rows of
the tokens the batch contains (rows of absent tokens stay exactly zero): the set of
nonzero rows *is* the bag of tokens.  Under Gaussian noise on the gradient every row is
nonzero, but absent rows then all have about the noise's norm and present rows stand
above it (:func:`token_bag` cuts at the widest gap).  This is the first step of
iDLG-style label recovery (Zhao et al., "iDLG: Improved Deep Leakage from Gradients",
arXiv 2001.02610), of LAMP (Balunovic et al., NeurIPS 2022, arXiv 2202.08827), FILM
(Gupta et al., NeurIPS 2022, arXiv 2205.08514) and DAGER (Petrov et al., NeurIPS 2024,
arXiv 2405.15586).

Blind spot (documented, not a bug): in a dense causal LM trained with
``labels = input_ids`` the last token of a row influences no loss term, so it is in the
bag only if it also occurs earlier in some row (DAGER recovers it from the LM-head
gradient instead).  A mixture of experts trained with the router's auxiliary loss has no
such spot: that loss covers every position, so the bag is complete.

    python -m attacks run runs/<fedsgd run> --attack bag-of-tokens
"""
import logging
from dataclasses import dataclass

import torch

from testbed.errors import ConfigError

from .base import Attack, Reconstruction, ThreatModel
from .view import MessageGroup

log = logging.getLogger(__name__)

AGGREGATE = "*"   # the "party" of a gradient summed over every selected party


@dataclass
class GradientBatch:
    """One party's captured gradient for one step (tensors load lazily)."""

    protocol: str
    party: str
    step: int
    group: MessageGroup
    rows: int = 0          # batch rows behind the gradient when known (an aggregate's total)
    scale: float = 1.0     # captured tensor x scale = gradient (a FedAvg delta: -1 / lr)
    note: str = None       # why the scaled tensor is not exactly one batch's gradient

    def names(self):
        return self.group.received_names

    def get(self, param_name):
        """The gradient of ``param_name`` (exact name, else the unique captured name that
        ends with it, so ``layers.0.self_attn.q_proj.weight`` finds ``model.layers.0...``),
        times :attr:`scale`."""
        names = self.group.received_names
        hits = [param_name] if param_name in names else \
            [n for n in names if n.endswith("." + param_name) or param_name.endswith("." + n)]
        if len(hits) != 1:
            raise KeyError(f"{self.party} step {self.step}: no unique gradient for {param_name!r} "
                           f"(captured: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''})")
        t = self.group.received(hits[0])
        return t if self.scale == 1.0 else t * self.scale

    def has(self, param_name):
        try:
            self.get(param_name)
            return True
        except KeyError:
            return False


def gradient_batches(view, kinds, steps=None, max_batches=0, aggregate=False):
    """Every (party, step) gradient the view's observer saw, in capture order.

    ``kinds``: message kinds carrying gradients; ``steps``: an optional list of steps to
    keep; ``max_batches``: keep at most this many (0 = all).  The party is the message's
    ``meta["party"]`` when present, else its sender.  Updates masked by secure aggregation
    (meta ``secagg``) are no party's gradient to anyone without the pads: skipped.  With
    ``aggregate`` the batches are instead the coordinator's broadcast averages (kind
    ``update``): one gradient of every selected party's rows together, as party ``*``.

    FedAvg deltas (kind ``delta``) come scaled to gradients by :func:`delta_scaling`, with
    its note when they are not one.
    """
    if aggregate and view.protocol != "fedsgd":
        raise ConfigError("attacks", [f"aggregate: inverts FedSGD's broadcast mean gradient; "
                                      f"{view.protocol} broadcasts no gradient"])
    out = []
    for group in view.groups(kind=("update",) if aggregate else tuple(kinds), by=("src", "step"),
                             with_tensors=True):
        step = group.key["step"]
        if steps is not None and step not in steps:
            continue
        meta = group.messages[0].meta
        if aggregate:
            out.append(GradientBatch(view.protocol, AGGREGATE, step, group, int(meta.get("n_samples", 0))))
        else:
            party = meta.get("party") or group.key["src"]
            if not str(party).startswith("party-") or "secagg" in meta:
                continue  # an aggregate, or a masked update: no single party's batch
            batch = GradientBatch(view.protocol, party, step, group)
            if group.messages[0].kind == "delta":
                batch.scale, batch.note, batch.rows = delta_scaling(view, meta)
            out.append(batch)
        if max_batches and len(out) >= max_batches:
            break
    return out


def delta_scaling(view, meta):
    """How a FedAvg party's weight delta becomes a gradient -> (scale, note, batch rows).

    With ``local_steps: 1`` and plain SGD (no weight decay) the delta is
    ``-lr x`` the gradient of the party's mean loss on one batch, taken at the round's
    global weights: scale ``-1 / lr`` gives that gradient exactly (up to float rounding).
    Otherwise the scaled delta is not one batch's gradient -- K local steps sum K
    gradients taken at drifting weights over K batches (the rows behind it: K x
    ``batch_size``); Adam divides each coordinate by its own running scale; weight decay
    adds ``lr x wd x w`` to every weight -- and the note says so.  What survives then: a
    coordinate of the delta is still zero where no local step's gradient touched it (an
    embedding row of a token absent from all K batches), so the bag of tokens still holds
    -- under Adam, a row an earlier round of the party touched keeps moving on its
    moments, so the set grows to the tokens of every round the party trained so far."""
    cfg = view.config()
    tr = cfg["training"]
    k = meta.get("local_steps") or (cfg["protocol"].get("options") or {}).get("local_steps", 2)
    why = [f"local_steps={k}"] if k != 1 else []
    if tr.get("optimizer", "adamw") != "sgd":
        why.append(f"optimizer={tr.get('optimizer', 'adamw')}")
    if tr.get("weight_decay", 0.0):
        why.append(f"weight_decay={tr['weight_decay']}")
    note = "delta is not a scaled gradient: " + " / ".join(why) if why else None
    return -1.0 / float(tr["lr"]), note, int(k) * int(tr["batch_size"])


class StepWeights:
    """The weights each FedSGD step's gradient was taken at, rebuilt from what the observer saw.

    Step 0 is the shared starting checkpoint.  After each round every party puts the
    broadcast mean gradient (kind ``update``) into ``p.grad`` and takes one step of the
    public ``training.optimizer``, so an observer of the updates (the coordinator, who
    sends them, a party, or the wire) replays the same steps and holds the same weights.
    Under FedAvg the broadcast is the mean weight delta, which every party adds to the
    round's starting weights: replayed by addition.  :meth:`at` must be called with
    non-decreasing steps; it returns ``None`` when an update before ``step`` was not observed.
    """

    def __init__(self, view, update_kind="update"):
        from parties.base import make_optimizer
        from testbed.scenario import TrainingCfg
        self.model = view.init_model()
        self.add = view.protocol == "fedavg"
        self.opt = None if self.add else make_optimizer(self.model.parameters(),
                                                        TrainingCfg(**view.config()["training"]))
        self.updates = {}
        for m in view.messages(kind=update_kind, with_tensors=True):
            self.updates.setdefault(m.step, m)
        self.step = 0

    def at(self, step):
        if step < self.step:
            raise ValueError(f"StepWeights.at: step {step} is before the replayed step {self.step}")
        while self.step < step:
            msg = self.updates.get(self.step)
            if msg is None:
                return None
            names = msg.received_names
            for name, p in self.model.named_parameters():
                hit = [n for n in names if n == name or n.endswith("." + name) or name.endswith("." + n)]
                if len(hit) != 1:
                    continue
                if self.add:
                    with torch.no_grad():
                        p.add_(msg.received(hit[0]).to(p.dtype))
                else:
                    p.grad = msg.received(hit[0]).to(p.dtype)
            if not self.add:
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
            self.step += 1
        return self.model


def batch_shape(view, batch):
    """(rows, length) of the private batch behind ``batch``: its known rows, else the
    public ``training.batch_size``, by ``training.seq_len``."""
    tr = view.config()["training"]
    return batch.rows or tr["batch_size"], tr["seq_len"]


def param_name(model, param):
    """The name under which ``param`` appears in ``model.named_parameters()``."""
    for name, p in model.named_parameters():
        if p is param:
            return name
    raise KeyError("parameter not found in model")


def token_bag(batch, model, rel_tol=0.0):
    """Token ids whose input-embedding gradient row stands out.

    ``rel_tol`` > 0: rows with norm > ``rel_tol`` x the largest.  0 (auto): the nonzero
    rows when some rows are exactly zero (an exact gradient); otherwise (every row
    nonzero: noise was added) the rows above the widest gap of the sorted log row norms --
    noise alone gives every absent row about the same norm, present rows stand above it.
    """
    g = batch.get(param_name(model, model.get_input_embeddings().weight)).double()
    norms = g.norm(dim=1)
    if norms.max() == 0:
        return []
    if rel_tol > 0:
        return torch.nonzero(norms > rel_tol * norms.max()).flatten().tolist()
    if (norms == 0).any():
        return torch.nonzero(norms > 0).flatten().tolist()
    ordered = norms.sort(descending=True).values.log()
    cut = int((ordered[:-1] - ordered[1:]).argmax()) + 1
    return torch.nonzero(norms >= ordered[cut - 1].exp()).flatten().tolist()


class BagOfTokens(Attack):
    """Nonzero rows of the input-embedding gradient = the tokens in the batch."""

    name = "bag-of-tokens"
    threat_model = ThreatModel(
        observers=("coordinator", "wire"),
        knowledge=frozenset({"config", "init_model"}),
        summary="aggregator that sees each party's gradient; knows the architecture "
                "(parameter names) from the shared starting checkpoint")
    targets = {"fedsgd": ("grad",), "fedavg": ("delta",)}
    options = {"rel_tol": 0.0, "steps": None, "max_batches": 0}

    def run(self, view, rel_tol=0.0, steps=None, max_batches=0):
        model = view.init_model()
        adam = "" if view.config()["training"].get("optimizer") == "sgd" else \
            ", with Adam's moments every earlier round's too"
        out = []
        for b in gradient_batches(view, self.kinds(view.protocol), steps, max_batches):
            bag = token_bag(b, model, rel_tol)
            meta = {"tokens": len(bag)}
            if b.note:   # a delta's nonzero embedding rows are still its batches' tokens
                meta["note"] = f"{b.note} (its nonzero embedding rows still give the token set{adam})"
            out.append(Reconstruction(b.protocol, b.party, b.step, bag, kind="set", meta=meta))
        return out


ATTACK = BagOfTokens
