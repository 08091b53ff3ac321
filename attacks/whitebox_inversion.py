"""White-box inversion of split learning's cut-layer activations through known bottom layers.

Threat model: the split-learning server sees each party's cut-layer activations
``act`` [B, T, H] and knows the weights that produced them: the party's bottom
(embeddings + blocks ``0 .. cut-1``) starts as the shared checkpoint, and the server can
keep track of it while the party trains -- each party update is the gradient the server
itself sent back (``grad``), pushed through the bottom on the batch just recovered and
stepped with the public optimizer settings (``replay``, :class:`BottomReplay`).  Without
replay the bottom is known exactly only at step 0 or when the party-side layers are
frozen.  The attacker runs its copy of the bottom on candidate inputs and keeps those
whose activation matches the captured one (cosine similarity).

Measured (greedy): exact on split-tiny cut 1 and 2 with the pre-trained PrivateLoRA base
as checkpoint over 20 steps with replay; without replay 0.95 (cut 1) and 0.74 (cut 2) as
the party's layers drift.  ``optimize`` reaches ~0.94 / ~0.56 there on the first steps.

Two methods (``method``):

* ``greedy`` (default): the model is causal, so the activation at position t depends on
  tokens ``0 .. t`` only.  For t = 0, 1, ... every candidate token is appended to the
  recovered prefix and the one whose position-t activation is most similar to the
  captured one is kept.  Exact with a known bottom (the true token reproduces the
  activation to float precision) and costs ``B x V x T^2 / 2`` token evaluations --
  cheap for small vocabularies.  In the spirit of the exact layer-by-layer search of
  DAGER (Petrov et al., NeurIPS 2024, https://arxiv.org/abs/2405.15586) applied to
  activations instead of gradients.
* ``optimize``: gradient descent on a relaxed input -- per position a softmax over the
  vocabulary whose mixture of embeddings is fed through the bottom -- minimising
  ``1 - cos`` to the captured activation, then the argmax token; the white-box
  optimisation attack on split learning of He, Zhang, Lee, "Model Inversion Attacks
  against Collaborative Inference", ACSAC 2019, https://doi.org/10.1145/3359789.3359824,
  relaxed over the vocabulary as in Chen et al., BiSR, CCS 2024,
  https://arxiv.org/abs/2409.00960.

    python -m attacks run runs/<split run> --attack whitebox-inversion [--option method=optimize]
"""
import copy
import logging

import torch
import torch.nn.functional as F

from parties import layers as L
from parties.base import make_optimizer
from testbed.errors import ConfigError
from testbed.scenario import TrainingCfg

from .base import Attack, ThreatModel
from .inversion_common import (attacker_model, batched, candidate_ids, captures, received,
                               sequence_reconstructions, split_states)
from .tag import torch_threads

log = logging.getLogger(__name__)


def greedy_invert(model, target, cut, cand, chunk=1024):
    """Token ids [B, T] whose cut activation matches ``target`` [B, T, H], position by
    position over the candidate ids ``cand`` [C]; also the chosen cosine per position."""
    B, T, _ = target.shape
    C = len(cand)
    prefix = torch.zeros(B, 0, dtype=torch.long)
    sims = torch.zeros(B, T)
    for t in range(T):
        ids = torch.cat([prefix.repeat_interleave(C, 0), cand.repeat(B).unsqueeze(1)], 1)
        last = batched(lambda x: split_states(model, x, cut)[:, -1], ids, max(1, chunk // (t + 1)))
        sim = F.cosine_similarity(last.view(B, C, -1).double(), target[:, t].double().unsqueeze(1), dim=-1)
        best = sim.max(-1)
        prefix = torch.cat([prefix, cand[best.indices].unsqueeze(1)], 1)
        sims[:, t] = best.values.float()
    return prefix, sims


def optimize_invert(model, target, cut, cand, iters, lr, temperature, gen):
    """Token ids [B, T] from a softmax relaxation over ``cand`` optimised with Adam so the
    cut activation of the mixed embeddings matches ``target`` by cosine; also the final
    cosine per position of the *discrete* answer."""
    B, T, _ = target.shape
    emb = L.base(model).embed_tokens.weight.detach()[cand]
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    z = (0.01 * torch.randn(B, T, len(cand), generator=gen)).requires_grad_()
    opt = torch.optim.Adam([z], lr=lr)
    try:
        for it in range(iters):
            opt.zero_grad()
            mix = torch.softmax(z / temperature, -1) @ emb
            loss = (1 - F.cosine_similarity(split_states(model, None, cut, embeds=mix), target, dim=-1)).mean()
            loss.backward()
            opt.step()
            if it % 100 == 0:
                log.debug("whitebox optimize iter %d loss %.4g", it, float(loss.detach()))
    finally:
        for p in trainable:
            p.requires_grad_(True)
    ids = cand[z.detach().argmax(-1)]
    with torch.no_grad():
        sims = F.cosine_similarity(split_states(model, ids, cut), target, dim=-1)
    return ids, sims


class BottomReplay:
    """Each party's bottom layers as the server can track them: start at the checkpoint,
    and after inverting a step's batch, apply the party's own update -- the gradient the
    server sent back (``grad``) through the bottom on the recovered tokens, stepped with
    the public optimizer settings.  Exact as long as every inversion is, so a known bottom
    stays known while the party trains it.  Not valid under SplitFed (the averaged weights
    go through the fed server) or DP-SGD (clipped, noised updates): :meth:`valid` says so.
    """

    def __init__(self, view, model, cut):
        cfg = view.config()
        self.cut, self.parties = cut, {}
        self.grads = {(m.dst, m.step): m for m in view.messages(kind="grad", with_tensors=True)}
        self.training = TrainingCfg(**cfg["training"])
        self._base = model
        sync = cfg["protocol"].get("options", {}).get("sync", "none")
        dp = [d for d in cfg["defences"] if d.get("type") == "dp_sgd"]
        self.problem = ("SplitFed averages party weights out of the server's sight" if sync == "splitfed"
                        else "DP-SGD clips and noises the party's updates" if dp else None)

    def valid(self):
        return self.problem is None

    def model(self, party):
        """The tracked bottom of ``party`` (the checkpoint's until its first update)."""
        if party not in self.parties:
            m = L.keep_only(copy.deepcopy(self._base), embed=True, blocks=range(self.cut))
            m.requires_grad_(True)
            self.parties[party] = (m, make_optimizer(m.parameters(), self.training))
        return self.parties[party][0]

    def update(self, party, step, ids):
        """Apply ``party``'s update of ``step`` given its (recovered) batch; False when the
        server never sent that step's gradient (the tracked weights then stay stale)."""
        msg = self.grads.get((party, step))
        if msg is None:
            return False
        m, opt = self.model(party), self.parties[party][1]
        split_states(m, ids, self.cut).backward(received(msg)["grad"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return True


class WhiteboxInversion(Attack):
    """Match captured cut activations through the attacker's copy of the bottom layers."""

    name = "whitebox-inversion"
    threat_model = ThreatModel(
        observers=("server", "wire"),
        knowledge=frozenset({"config", "tokenizer", "init_model"}),
        summary="split-learning server that knows the party's bottom layers: the starting checkpoint, "
                "tracked through the party's updates from the gradients the server sends back")
    targets = {"split": ("act",)}
    options = {"method": "greedy", "replay": True, "iters": 300, "lr": 0.05, "temperature": 0.1,
               "seed": 0, "threads": 1, "steps": None, "max_batches": 0}

    def capture_needs(self, protocol, options):
        """With replay the bottom at a step depends on every earlier batch and gradient."""
        steps, _ = super().capture_needs(protocol, options)
        if not options.get("replay", True):
            return steps, ()
        return (None if steps is None else list(range(max(steps, default=-1) + 1)), ("grad",))

    def run(self, view, method="greedy", replay=True, iters=300, lr=0.05, temperature=0.1, seed=0,
            threads=1, steps=None, max_batches=0):
        """``method``: ``greedy`` or ``optimize`` (``iters``, ``lr``, ``temperature``, ``seed``
        apply to it); ``replay``: track each party's bottom through its updates
        (:class:`BottomReplay`; off: always the checkpoint); ``threads``: torch threads
        while running; ``steps``/``max_batches``: which captured batches to report."""
        if method not in ("greedy", "optimize"):
            raise ConfigError(f"attacks.{self.name}.options",
                              [f"method: expected 'greedy' or 'optimize' (got {method!r})"])
        model = attacker_model(view)
        cand = candidate_ids(view, model.config.vocab_size)
        wanted = captures(view, "act", "act", steps, max_batches)
        cut = int(wanted[0].meta["layer"]) if wanted else 0
        tracker = BottomReplay(view, model, cut) if replay and cut > 0 else None
        note = None
        if tracker is not None and not tracker.valid():
            note, tracker = f"replay off: {tracker.problem}", None
        if tracker is not None and wanted:
            # the bottom at a step depends on every earlier batch: invert those too
            last = max(c.step for c in wanted)
            todo = [c for c in captures(view, "act", "act") if c.step <= last]
        else:
            todo = wanted
        keep = {c.seq for c in wanted}
        out = []
        with torch_threads(threads):
            for cap in sorted(todo, key=lambda c: (c.step, c.seq)):
                bottom = tracker.model(cap.party) if tracker is not None else model
                if method == "greedy":
                    ids, sims = greedy_invert(bottom, cap.states, cut, cand)
                else:
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + cap.seq)
                    ids, sims = optimize_invert(bottom, cap.states, cut, cand, iters, lr, temperature, gen)
                log.info("whitebox %s step %d: mean cosine %.6f", cap.party, cap.step, float(sims.mean()))
                if tracker is not None and not tracker.update(cap.party, cap.step, ids):
                    note = f"replay stale for {cap.party} after step {cap.step}: its gradient was not observed"
                if cap.seq not in keep:
                    continue
                for rec, s in zip(sequence_reconstructions(cap, ids, method=method,
                                                           replay=tracker is not None), sims):
                    rec.meta.update(mean_cosine=float(s.mean()), min_cosine=float(s.min()))
                    if note:
                        rec.meta["note"] = note
                    out.append(rec)
        return out


ATTACK = WhiteboxInversion
