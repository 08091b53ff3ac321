"""TAG: gradient matching on continuous embeddings, with LAMP-style discrete reordering.

Deng et al., "TAG: Gradient Attack on Transformer-based Language Models", Findings of
EMNLP 2021, https://arxiv.org/abs/2103.06819 ; reordering after Balunovic et al.,
"LAMP: Extracting Text from Gradients with Language Model Priors", NeurIPS 2022,
https://arxiv.org/abs/2202.08827

Threat model: an honest-but-curious aggregator sees one party's gradient for one batch
and knows the weights it was computed at (the shared starting checkpoint) and the batch
shape.  Unlike DAGER it needs no rank condition and no exact gradient: it is the family
meant for noised gradients (DP-SGD; raise ``bag_rel_tol`` so noise rows leave the bag).

1. Bag of tokens (:mod:`attacks.bag_of_tokens`) restricts the vocabulary to the tokens
   present.  Dummy inputs are optimised so that the model's gradient on them matches the
   captured one, with TAG's distance ``||dW' - dW||^2 + alpha ||dW' - dW||_1`` (each term
   divided by the captured gradient's own norm, so one learning rate fits every model):

   * ``embeddings: mixture`` (default): each position is a softmax over the bag; its
     input embedding is the mixture of the bag's embeddings and the previous position's
     soft label is the same distribution (labels are the next inputs in a causal LM);
   * ``embeddings: free``: TAG as published -- free input embeddings and separate soft
     labels over the bag; the input embedding gradient cannot be matched then.

   Each position is then projected on a token: the argmax of its distribution
   (``mixture``), or the bag token with the nearest embedding by cosine (``free``).
2. LAMP reordering (``reorder`` proposals, 0 to skip): random swaps, moves, replacements
   and drop-a-duplicate-insert-a-missing-bag-token edits are kept when they lower the
   gradient distance of the discrete batch.  LAMP's language-model prior is left out: the starting
   checkpoint is random on the tiny scenarios, so it would carry no signal.

Double backward needs the eager attention (SDPA on CPU has no second derivative) and,
for mixtures of experts, the eager expert loop.  The attack limits torch to ``threads``
threads while it runs (default 1: on a shared machine the tiny matrix products lose far
more to thread contention than they gain).

    python -m attacks run runs/<fedsgd run> --attack tag --option iters=300
"""
import copy
import logging
import zlib
from contextlib import contextmanager

import torch

from parties.models import is_moe
from testbed.errors import ConfigError

from .bag_of_tokens import StepWeights, batch_shape, gradient_batches, param_name, token_bag
from .base import FEDSGD_AGGREGATOR, Attack, Reconstruction

log = logging.getLogger(__name__)


def second_order_copy(model):
    """A float32 copy of ``model`` whose forward pass can be differentiated twice."""
    model = copy.deepcopy(model).float()
    model.set_attn_implementation("eager")
    if hasattr(model, "set_experts_implementation") and is_moe(model):
        model.set_experts_implementation("eager")
    return model


@contextmanager
def torch_threads(n):
    """Limit torch's intra-op threads to ``n`` (0: leave as is) inside the block."""
    was = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(was)


class GradientDistance:
    """TAG's distance between a candidate batch's gradient and the captured one."""

    def __init__(self, model, batch, alpha, skip=()):
        self.model = model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad and n not in skip]
        self.params = [dict(model.named_parameters())[n] for n in self.names]
        self.target = [batch.get(n).float() for n in self.names]
        self.l2 = sum(float((g ** 2).sum()) for g in self.target) or 1.0
        self.l1 = sum(float(g.abs().sum()) for g in self.target) or 1.0
        self.alpha = alpha

    def __call__(self, loss, create_graph):
        grads = torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True)
        d2 = d1 = 0.0
        for g, t in zip(grads, self.target):
            diff = -t if g is None else g - t
            d2 = d2 + (diff ** 2).sum()
            d1 = d1 + diff.abs().sum()
        return d2 / self.l2 + self.alpha * d1 / self.l1

    def of_tokens(self, ids):
        """Distance of a discrete batch [B, L] (one backward, no second order)."""
        loss = self.model(input_ids=ids, labels=ids).loss
        return float(self(loss, create_graph=False))


def soft_lm_loss(model, inputs_embeds, label_probs, bag):
    """Mean cross-entropy of next-position predictions against soft labels over ``bag``."""
    logits = model(inputs_embeds=inputs_embeds).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1)[..., bag]
    return -(label_probs * logp).sum(-1).mean()


def optimise(model, dist, bag, shape, mode, iters, lr, gen):
    """Continuous phase; returns token ids [B, L] (indices into the full vocabulary)."""
    emb = model.get_input_embeddings().weight
    bag_t = torch.tensor(bag)
    B, L = shape
    z = (torch.randn(B, L, len(bag), generator=gen) * 0.1).requires_grad_()
    free = mode == "free"
    x = None
    if free:
        x = (torch.randn(B, L, emb.shape[1], generator=gen) * float(emb.detach().std())).requires_grad_()
    opt = torch.optim.Adam([z] + ([x] if free else []), lr=lr)
    for it in range(iters):
        opt.zero_grad()
        probs = torch.softmax(z, -1)
        if free:
            loss = soft_lm_loss(model, x, probs[:, 1:], bag_t)
        else:
            loss = soft_lm_loss(model, probs @ emb[bag_t], probs[:, 1:], bag_t)
        d = dist(loss, create_graph=True)
        d.backward()
        opt.step()
        if it % 100 == 0:
            log.debug("tag iter %d distance %.4g", it, float(d.detach()))
    with torch.no_grad():
        if not free:
            return bag_t[z.argmax(-1)]
        cos = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(emb[bag_t], dim=-1).T
        return bag_t[cos.argmax(-1)]


def _pick(items, gen):
    return items[int(torch.randint(len(items), (1,), generator=gen))]


def propose(best, bag, gen):
    """One LAMP-style edit of the batch [B, L]: a swap, a move, a replacement, or -- since
    every bag token occurs in the batch -- a duplicated token dropped and a bag token the
    guess lacks inserted (the continuous phase tends to repeat a token and miss another)."""
    B, L = best.shape
    cand = best.clone()
    b = int(torch.randint(B, (1,), generator=gen))
    i, j = (int(v) for v in torch.randint(L, (2,), generator=gen))
    move = int(torch.randint(4, (1,), generator=gen))
    present = set(best.flatten().tolist())
    missing = [t for t in bag.tolist() if t not in present]
    if move == 0:
        cand[b, i], cand[b, j] = best[b, j], best[b, i]
    elif move == 1:
        row = best[b].tolist()
        row.insert(j, row.pop(i))
        cand[b] = torch.tensor(row)
    elif move == 2 or not missing:
        cand[b, i] = _pick(missing or bag.tolist(), gen)
    else:
        row = best[b].tolist()
        dups = [k for k, t in enumerate(row) if row.count(t) > 1] or list(range(L))
        row.pop(_pick(dups, gen))
        row.insert(j, _pick(missing, gen))
        cand[b] = torch.tensor(row)
    return cand


def lamp_reorder(dist, ids, bag, proposals, gen):
    """LAMP-style local search: keep the edits (:func:`propose`) that lower the gradient
    distance of the discrete batch.  -> (token ids [B, L], final distance)."""
    best, best_d = ids.clone(), dist.of_tokens(ids)
    for _ in range(proposals):
        cand = propose(best, bag, gen)
        d = dist.of_tokens(cand)
        if d < best_d:
            best, best_d = cand, d
    return best, best_d


def attacked_batches(view, kinds, steps, max_batches, seed, out):
    """Yield (batch, model, generator) for each captured gradient batch of ``kinds`` at
    ``steps``, in step order: ``model`` a second-order copy of the weights the batch was
    computed at, ``generator`` one stream per batch (seeded from ``seed``, party and step,
    so a batch's result does not depend on capture order).  A batch whose weights are
    unknown gets an empty reconstruction with a note appended to ``out``."""
    weights = StepWeights(view)
    for b in sorted(gradient_batches(view, kinds, steps, max_batches), key=lambda b: b.step):
        model = weights.at(b.step)
        if model is None:
            note = f"weights at step {b.step} unknown (an earlier update was not observed)"
            out.append(Reconstruction(b.protocol, b.party, b.step, [], meta={"note": note}))
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{b.party}/{b.step}".encode()))
        yield b, second_order_copy(model), gen


class Tag(Attack):
    """Gradient matching on continuous inputs, then projection and reordering."""

    name = "tag"
    threat_model = FEDSGD_AGGREGATOR
    targets = {"fedsgd": ("grad",), "fedavg": ("delta",)}
    replays = {"fedsgd": ("update",), "fedavg": ("update",)}  # StepWeights rebuilds each step's weights
    options = {"iters": 200, "lr": 0.1, "alpha": 0.01, "embeddings": "mixture", "reorder": 200,
               "bag_rel_tol": 0.0, "seed": 0, "threads": 1, "steps": [0], "max_batches": 0}

    def run(self, view, iters=200, lr=0.1, alpha=0.01, embeddings="mixture", reorder=200,
            bag_rel_tol=0.0, seed=0, threads=1, steps=(0,), max_batches=0):
        """``iters``: continuous steps; ``reorder``: discrete proposals; ``bag_rel_tol``: a
        row-norm threshold for the bag (raise it when the gradient is noised)."""
        if embeddings not in ("mixture", "free"):
            raise ConfigError("attacks.tag.options",
                              [f"embeddings: expected 'mixture' or 'free' (got {embeddings!r})"])
        out = []
        with torch_threads(threads):
            for b, model, gen in attacked_batches(view, self.kinds(view.protocol), steps, max_batches,
                                                  seed, out):
                embed = param_name(model, model.get_input_embeddings().weight)
                skip = {embed} if embeddings == "free" else set()
                bag = token_bag(b, model, bag_rel_tol)
                if not bag:
                    out.append(Reconstruction(b.protocol, b.party, b.step, [], meta={"note": "empty bag"}))
                    continue
                dist = GradientDistance(model, b, alpha, skip)
                ids = optimise(model, dist, bag, batch_shape(view, b), embeddings, iters, lr, gen)
                d = None
                if reorder:
                    ids, d = lamp_reorder(dist, ids, torch.tensor(bag), reorder, gen)
                meta = {"distance": d, "bag": len(bag), **({"note": b.note} if b.note else {})}
                for row in ids.tolist():
                    out.append(Reconstruction(b.protocol, b.party, b.step, row, meta=dict(meta)))
        return out


ATTACK = Tag
