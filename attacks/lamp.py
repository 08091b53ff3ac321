"""LAMP: gradient matching alternated with discrete reordering under a language-model prior.

Balunovic, Dimitrov, Jovanovic, Vechev, "LAMP: Extracting Text from Gradients with
Language Model Priors", NeurIPS 2022, https://arxiv.org/abs/2202.08827

Threat model: TAG's (:mod:`attacks.tag`) -- an honest-but-curious aggregator sees one
party's gradient for one batch (FedSGD), or its weight delta after one local SGD step
(FedAvg: ``-lr`` x the gradient, :func:`attacks.bag_of_tokens.delta_scaling`), and knows
the weights it was computed at and the batch shape.  The language model LAMP scores
candidates with is the one the attacker holds anyway: those same weights (the shared
starting checkpoint, plus the broadcast updates at later steps).  On a random checkpoint
the prior carries no signal; on a pre-trained one (``init: {pretrain: ...}``) it does.

Bag.  The embedding gradient's nonzero rows give the tokens of the batch
(:func:`attacks.bag_of_tokens.token_bag`), except a row's last token, which is never an
input; it is a label, and the LM-head gradient names it (:func:`label_tokens`), so the
search runs over the bag plus those (``labels``).

Each of ``restarts`` restarts alternates two phases for ``iters`` iterations:

1. Continuous.  Each position is a softmax over the bag; its input embedding is the
   mixture of the bag's embeddings and the previous position's soft label the same
   distribution (TAG's ``mixture``: a causal LM's labels are its next inputs).  The loss
   is LAMP's: per tensor ``1 - cos`` between the candidate's and the captured gradient,
   plus ``l2_weight`` x TAG's normalised squared distance, plus ``emb_weight`` x LAMP's
   embedding-norm regulariser ``(mean_i ||x_i|| - mean_v ||e_v||)^2`` (a mixture of
   several tokens is shorter than one token, so it also pushes positions towards one
   token; 0 by default, as it measured no better).  ``init: random`` starts from small
   random logits (TAG), ``init: bag`` with every bag token placed once at least.
2. Discrete, every ``discrete_every`` iterations.  The positions are projected on
   tokens (argmax) and ``candidates`` edits proposed -- swaps, token moves, span moves
   and rotations (LAMP's reordering), TAG's replace / drop-a-duplicate-insert-a-missing
   edits -- plus every bag token at one random position.  Each is scored by its gradient
   distance plus ``lm_weight`` x its rows' mean next-token loss under the attacker's
   model (LAMP's perplexity term, in log space); the best, if it beats the current
   projection, is kept and the logits (and Adam's moments) are permuted to follow it,
   so the continuous phase resumes from the chosen order.

The restart with the lowest combined score is refined by greedy local search under the
same score until ``reorder`` edits were scored.  Candidates are scored together: their
gradients in one vectorised pass (``torch.func.vmap``), which makes the discrete search
-- where most of LAMP's gain over TAG comes from on these small models -- cheap.

Options are TAG's where they mean the same; ``iters`` counts optimisation steps,
``steps`` the training steps attacked (default the first).  Double backward and
``threads``: as in :mod:`attacks.tag`.

    python -m attacks run runs/<fedsgd run> --attack lamp --option lm_weight=0.2
"""
import logging

import torch

from parties.models import is_moe
from testbed.errors import ConfigError

from .bag_of_tokens import batch_shape, param_name, token_bag
from .base import FEDSGD_AGGREGATOR, Attack, Reconstruction
from .tag import GradientDistance, attacked_batches, propose, soft_lm_loss, torch_threads

log = logging.getLogger(__name__)


class CosineDistance(GradientDistance):
    """LAMP's distance: mean over tensors of ``1 - cos(dW', dW)`` plus ``l2_weight`` x
    TAG's squared distance divided by the captured gradient's squared norm.

    :meth:`many` scores candidate batches [C, B, L] together: their gradients in one
    vectorised pass (``torch.func.vmap``; a mixture of experts, whose routing has
    data-dependent shapes, one candidate at a time)."""

    def __init__(self, model, batch, l2_weight):
        super().__init__(model, batch, alpha=0.0)
        self.l2_weight = l2_weight
        self.norms = [t.norm() for t in self.target]
        self.live = sum(1 for n in self.norms if n > 0) or 1
        self._grads = None
        if not is_moe(model):
            from torch.func import functional_call, grad, vmap
            fixed = {n: p.detach() for n, p in model.named_parameters() if n not in set(self.names)}
            mine = {n: p.detach() for n, p in zip(self.names, self.params)}

            def loss(params, ids):
                return functional_call(model, {**fixed, **params}, (), {"input_ids": ids, "labels": ids}).loss
            batched = vmap(grad(loss), in_dims=(None, 0))
            self._grads = lambda ids: [batched(mine, ids)[n] for n in self.names]

    def combine(self, grads):
        """Distances [C] from each tensor's candidate gradients [C, ...] (None: not reached)."""
        cos = d2 = 0.0
        for g, t, n in zip(grads, self.target, self.norms):
            if g is None:
                cos, d2 = cos + float(n > 0), d2 + (t ** 2).sum()
                continue
            g, t = g.flatten(1), t.reshape(1, -1)
            if n > 0:
                cos = cos + 1 - (g * t).sum(1) / (g.norm(dim=1) * n + 1e-20)
            d2 = d2 + ((g - t) ** 2).sum(1)
        return cos / self.live + self.l2_weight * d2 / self.l2

    def __call__(self, loss, create_graph):
        grads = torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True)
        return self.combine([None if g is None else g.unsqueeze(0) for g in grads])[0]

    def many(self, ids):
        """Distance of each candidate batch ``ids`` [C, B, L] -> [C]."""
        if self._grads is None:
            return torch.tensor([self.of_tokens(c) for c in ids])
        with torch.no_grad():
            return self.combine(self._grads(ids))


class Prior:
    """The combined discrete score: gradient distance (``dist``; None: none) plus
    ``weight`` x the rows' mean next-token loss under the attacker's ``model`` (LAMP's
    perplexity term, in log space)."""

    def __init__(self, model, dist, weight):
        self.model, self.dist, self.weight = model, dist, weight

    def lm_loss(self, ids):
        """Mean next-token loss of each batch ``ids`` [C, B, L] -> [C] (zeros without a prior)."""
        if not self.weight:
            return torch.zeros(ids.shape[0])
        C, B, L = ids.shape
        with torch.no_grad():
            logits = self.model(input_ids=ids.reshape(C * B, L)).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                    ids.reshape(C * B, L)[:, 1:].reshape(-1), reduction="none")
        return nll.reshape(C, -1).mean(1)

    def many(self, ids):
        """Combined score of each candidate batch [C, B, L] -> [C]."""
        d = torch.zeros(ids.shape[0]) if self.dist is None else self.dist.many(ids)
        return d + self.weight * self.lm_loss(ids)

    def __call__(self, ids):
        return float(self.many(ids.unsqueeze(0))[0])


def label_tokens(batch, model, bag, rows):
    """Up to ``rows`` tokens outside ``bag`` whose LM-head gradient rows are the largest.

    A row's last token is never an input, so the embedding gradient misses it unless it
    occurs earlier; it is a label, though, and the head gradient ``(P - Y)^T H / N``
    carries ``-h`` in the rows of the labels on top of the small ``P^T H`` every token
    gets (iDLG's label leak).  The ``rows`` largest rows outside the bag hold the missing
    last tokens (and, when a row's last token is in the bag, a spare candidate)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is emb.weight:
        return []
    norms = batch.get(param_name(model, head.weight)).float().norm(dim=1)
    norms[bag] = -1.0
    return [t for t in norms.argsort(descending=True)[:rows].tolist() if norms[t] > 0]


def edit(best, bag, gen):
    """One candidate edit of the batch [B, L] -> (candidate ids, source index [B, L]: the
    position of ``best``'s row each candidate position came from, -1 for a new token)."""
    B, L = best.shape
    src = torch.arange(L).repeat(B, 1)
    kind = int(torch.randint(5, (1,), generator=gen))
    if kind >= 3:   # TAG's edits (swap, move, replace, drop-duplicate + insert-missing)
        cand = propose(best, bag, gen)
        src[(cand != best)] = -1
        return cand, src
    b = int(torch.randint(B, (1,), generator=gen))
    i, j = sorted(int(v) for v in torch.randint(L + 1, (2,), generator=gen))
    order = list(range(L))
    if kind == 0:     # swap two tokens
        i, j = min(i, L - 1), min(j, L - 1)
        order[i], order[j] = order[j], order[i]
    elif kind == 1:   # move the span [i, j) elsewhere (LAMP's span move)
        span, rest = order[i:j], order[:i] + order[j:]
        k = int(torch.randint(len(rest) + 1, (1,), generator=gen))
        order = rest[:k] + span + rest[k:]
    else:             # rotate the row: the suffix from i goes first (LAMP's prefix move)
        order = order[i:] + order[:i]
    src[b] = torch.tensor(order)
    cand = best.clone()
    cand[b] = best[b, src[b]]
    return cand, src


def init_logits(bag, shape, how, gen):
    """Starting logits [B, L, |bag|]: small noise (``random``), plus a lean of 2 to one
    bag token per position with every bag token placed once at least (``bag``)."""
    B, L = shape
    z = torch.randn(B, L, len(bag), generator=gen) * 0.1
    if how == "bag":
        n = B * L
        order = torch.randperm(n, generator=gen)
        tokens = torch.cat([torch.randperm(len(bag), generator=gen),
                            torch.randint(len(bag), (max(0, n - len(bag)),), generator=gen)])[:n]
        z.view(n, -1)[order, tokens] += 2.0
    return z


def follow(z, state, src, cand, bag_index):
    """Re-arrange the logits (and Adam's moments) ``z`` [B, L, V] to the candidate's order:
    position (b, i) takes row ``src[b, i]``; new tokens (src -1) get a lean of 2 to theirs."""
    with torch.no_grad():
        idx = src.clamp_min(0).unsqueeze(-1).expand_as(z)
        tensors = [z] + [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]
        for t in tensors:
            t.copy_(torch.gather(t, 1, idx))
        for b, i in torch.nonzero(src < 0).tolist():
            z[b, i] = z[b, i].mean()
            z[b, i, bag_index[int(cand[b, i])]] += 2.0


def restart(model, dist, prior, bag, shape, opts, gen):
    """One LAMP restart: continuous phases alternating with discrete steps -> (ids, score)."""
    emb = model.get_input_embeddings().weight
    bag_t = torch.tensor(bag)
    bag_index = {t: k for k, t in enumerate(bag)}
    target_norm = emb[bag_t].detach().norm(dim=-1).mean()
    z = init_logits(bag, shape, opts["init"], gen).requires_grad_()
    opt = torch.optim.Adam([z], lr=opts["lr"])
    every = opts["discrete_every"]
    for it in range(1, opts["iters"] + 1):
        opt.zero_grad()
        probs = torch.softmax(z, -1)
        x = probs @ emb[bag_t]
        loss = dist(soft_lm_loss(model, x, probs[:, 1:], bag_t), create_graph=True)
        if opts["emb_weight"]:
            loss = loss + opts["emb_weight"] * (x.norm(dim=-1).mean() - target_norm) ** 2
        loss.backward()
        opt.step()
        if every and it % every == 0 and it < opts["iters"]:
            discrete_step(z, opt.state[z], prior, bag_t, bag_index, opts["candidates"], gen)
    with torch.no_grad():
        ids = bag_t[z.argmax(-1)]
    return ids, prior(ids)


def best_edit(prior, ids, bag_t, candidates, gen):
    """Score ``candidates`` random edits of ``ids`` and every bag token at one random
    position together -> (best candidate, its score, its source index), or None when
    none beats ``ids``'s own score."""
    edits = [edit(ids, bag_t, gen) for _ in range(candidates)]
    B, L = ids.shape
    b, i = int(torch.randint(B, (1,), generator=gen)), int(torch.randint(L, (1,), generator=gen))
    for t in bag_t.tolist():
        if t != int(ids[b, i]):
            cand, src = ids.clone(), torch.arange(L).repeat(B, 1)
            cand[b, i], src[b, i] = t, -1
            edits.append((cand, src))
    scores = prior.many(torch.stack([ids] + [c for c, _ in edits]))
    k = int(scores.argmin())
    return None if k == 0 else (edits[k - 1][0], float(scores[k]), edits[k - 1][1])


def discrete_step(z, state, prior, bag_t, bag_index, candidates, gen):
    """Project, score ``candidates`` edits, keep the best by ``prior``; move ``z`` to it."""
    with torch.no_grad():
        ids = bag_t[z.argmax(-1)]
    found = best_edit(prior, ids, bag_t, candidates, gen)
    if found is not None:
        follow(z, state, found[2], found[0], bag_index)


def refine(prior, ids, bag_t, proposals, candidates, gen):
    """Greedy local search under the combined score, ``candidates`` edits at a time, until
    ``proposals`` edits were scored -> (ids, score)."""
    best, best_s = ids.clone(), prior(ids)
    for _ in range(-(-proposals // max(1, candidates))):
        found = best_edit(prior, best, bag_t, candidates, gen)
        if found is not None:
            best, best_s = found[0], found[1]
    return best, best_s


class Lamp(Attack):
    """TAG's gradient matching with LAMP's cosine loss, reordering and language-model prior."""

    name = "lamp"
    threat_model = FEDSGD_AGGREGATOR
    targets = {"fedsgd": ("grad",), "fedavg": ("delta",)}
    replays = {"fedsgd": ("update",), "fedavg": ("update",)}  # StepWeights rebuilds each step's weights
    options = {"iters": 400, "restarts": 2, "lr": 0.1, "l2_weight": 1.0, "emb_weight": 0.0,
               "lm_weight": 0.2, "candidates": 32, "discrete_every": 50, "reorder": 3000,
               "init": "random", "labels": True, "bag_rel_tol": 0.0, "seed": 0, "threads": 1,
               "steps": [0], "max_batches": 0}

    def run(self, view, iters=400, restarts=2, lr=0.1, l2_weight=1.0, emb_weight=0.0, lm_weight=0.2,
            candidates=32, discrete_every=50, reorder=3000, init="random", labels=True, bag_rel_tol=0.0,
            seed=0, threads=1, steps=(0,), max_batches=0):
        """``iters``: continuous steps per restart; ``restarts``: independent starts (the
        best by combined score is kept); ``lm_weight``: weight of the language-model
        prior (0: none); ``candidates``: random edits scored per discrete step, every
        ``discrete_every`` iterations (0: none); ``reorder``: edits the final local
        search scores; ``labels``: add the LM-head gradient's label tokens to the bag."""
        problems = []
        if init not in ("bag", "random"):
            problems.append(f"init: expected 'bag' or 'random' (got {init!r})")
        if restarts < 1:
            problems.append(f"restarts: must be >= 1 (got {restarts})")
        if problems:
            raise ConfigError("attacks.lamp.options", problems)
        opts = {"iters": iters, "lr": lr, "emb_weight": emb_weight, "candidates": candidates,
                "discrete_every": discrete_every, "init": init, "restarts": restarts,
                "l2_weight": l2_weight, "lm_weight": lm_weight, "reorder": reorder, "labels": labels}
        out = []
        with torch_threads(threads):
            for b, model, gen in attacked_batches(view, self.kinds(view.protocol), steps, max_batches,
                                                  seed, out):
                bag = token_bag(b, model, bag_rel_tol)
                if not bag:
                    out.append(Reconstruction(b.protocol, b.party, b.step, [],
                                              meta={"note": b.note or "empty bag"}))
                    continue
                ids, meta = self.invert(b, model, bag, batch_shape(view, b), opts, gen)
                if b.note:
                    meta["note"] = b.note
                for row in ids.tolist():
                    out.append(Reconstruction(b.protocol, b.party, b.step, row, meta=dict(meta)))
        return out

    @staticmethod
    def invert(batch, model, bag, shape, opts, gen):
        """-> (token ids [B, L], meta) for one gradient batch with its bag of tokens."""
        extra = label_tokens(batch, model, bag, shape[0]) if opts["labels"] else []
        vocab = bag + extra
        dist = CosineDistance(model, batch, opts["l2_weight"])
        prior = Prior(model, dist, opts["lm_weight"])
        runs = [restart(model, dist, prior, vocab, shape, opts, gen) for _ in range(opts["restarts"])]
        ids, _ = min(runs, key=lambda r: r[1])
        ids, score = refine(prior, ids, torch.tensor(vocab), opts["reorder"], opts["candidates"], gen)
        return ids, {"score": score, "distance": dist.of_tokens(ids), "bag": len(bag), "labels": len(extra),
                     "restart_scores": [s for _, s in runs]}


ATTACK = Lamp
