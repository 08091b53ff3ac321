"""``pcmoe``: Privacy-preserving Collaborative Mixture-of-Experts training.

PC-MoE (Zhang, Ding, Low 2025, https://arxiv.org/abs/2506.02965).  Every party starts
from the shared checkpoint and keeps private its data and its backbone -- embeddings,
attention, norms, LM head and every MoE layer's router: those weights and their
gradients never leave it.  The experts of each MoE layer are split round-robin (party
``i`` hosts ``{e : e mod n = i}``, :mod:`parties.pcmoe.sharding`), so each party holds only
``m/n`` of them: the memory saving.  Tokens routed to a remote expert travel to its
host as hidden states and come back as expert outputs; in backward the gradient w.r.t.
that output goes to the host and the gradient w.r.t. the hidden states comes back
(:mod:`parties.pcmoe.owner`, :mod:`parties.pcmoe.host`).

Schedule (choice): a ``coordinator`` role draws a random permutation of the parties
per round from its own ``torch.Generator`` and gives each, in turn, one global step
(``turn`` -> one local mini-batch -> ``done``).  At eval steps it asks every party in
turn to evaluate its own held-out set (``eval_turn`` -> ``eval_done``; expert traffic
of kind ``eval_expert_*``, or the training kinds with ``eval_traffic: disguised``), and at the end sends ``stop``.  Between turns a party
serves expert requests.  The coordinator sees only this control traffic.

Choices where the paper is silent or differs, written down:

* The owner combines expert outputs with its own gate weights (the paper lets the
  signal continue on the host until the next routing decision; here it returns to the
  owner after every expert call, so the backbone stays with its owner).
* A token routed to two experts of the same host is sent once per expert
  (``counts`` per expert; ``dedup_rows`` sends it once); hosts return unweighted outputs.
* Hosts step their expert optimizer once per global step (see pcmoe_host).
* Each party has one AdamW over its backbone and hosted experts; host-side steps only
  touch expert parameters (the backbone has no gradient then).
* Data: party ``i`` samples its mini-batches with ``ctx.generator("party-i")``; with a
  single party the run *is* training at one site, so it draws from
  ``ctx.generator("site")`` -- the stream ``centralized`` uses -- which makes PC-MoE
  with ``parties.count: 1`` reproduce ``centralized`` step for step.
* Memory: each party first builds the whole shared checkpoint and then drops the
  experts it does not host (a real deployment would load only its shard); the tracker
  is attached after the drop.

Options (``protocol.options``): ``noise_sigma`` (float >= 0, default 0): std of the
Gaussian noise added to hidden states sent to hosts (a defence); ``expert_training``
(``all``, default, or ``own``): with ``own`` a host still runs its experts for other
parties' tokens and returns the gradient w.r.t. their input, but never updates its
experts from them -- experts learn only from their host's own tokens.  That is the
no-sharing ablation, also registered as protocol ``pcmoe_no_sharing``: the same
architecture and traffic without cross-party expert training.

Hiding options -- each shows a host no more than its computation needs, none changes the
math (losses equal the option off; tests/test_pcmoe_hiding.py), see
:mod:`parties.pcmoe.layout`:

* ``shuffle_rows`` (bool, default false): the rows of every (layer, host) message are
  permuted with the owner's private generator (inside each expert's block; over the
  message with ``dedup_rows``) and put back in order on return, so their order no longer
  gives the tokens' relative positions or top-k ranks.  ``truth/routes.jsonl`` records
  the positions in the order sent.
* ``dedup_rows`` (bool, default false): one row per (token, host) -- a token routed to
  several experts of one host is sent once, with an int32 ``row_index`` tensor mapping each
  (token, expert) pair to its row; the host returns one output per pair.  Fewer hidden
  bytes, 4 index bytes per pair; the host still learns which of its experts share a token
  (it needs that to compute).
* ``pad_counts`` (int >= 0, default 0 = off): every expert's pair count is padded up to a
  multiple of N with dummy rows (Gaussian, with the per-feature mean and std of the
  layer's real rows); the host computes on them, the owner drops their outputs and sends
  zero gradients.  Bytes grow by the padding; truth records dummy rows as ``[-1, -1]``
  and scoring skips them.  Experts that got no token stay absent from the message, and a
  host that can tell dummy rows from real ones by their values can still count the real
  ones; combine with ``shuffle_rows``, else dummy rows sit at the end of each block.
* ``eval_traffic`` (``plain``, default, or ``disguised``): ``plain`` sends evaluation as
  ``eval_expert_*`` with ``phase: eval``.  ``disguised`` sends it as ``expert_fwd`` /
  ``expert_out`` and leaves ``phase`` out of every expert message, so a request's kind and
  meta do not tell evaluation from training; the host keeps every forward's graph and
  drops the ones no backward follows.  It still learns which forwards were evaluation --
  after the fact, from the missing backward -- and when: evaluation comes at the public
  ``training.eval_every`` steps as a second forward pass of the step.  Evaluation data
  still reaches the hosts and is as exposed as training data (attacks on ``expert_fwd``
  now see it too; truth records its routes with ``eval: true`` and scoring skips them).
  ``local`` (evaluating without sending) is refused: a party holds only its own share of
  the experts, so its forward pass needs the other hosts.

Run:  python -m testbed run scenarios/pcmoe-4party.yaml
"""
import torch

from testbed.engine.codec import Message
from testbed.engine.effects import Log, Recv, Send
from testbed.errors import ConfigError, ProtocolError

from parties.base import Protocol, is_eval_step, make_optimizer, party_name
from .sharding import shard_model
from .host import REQUESTS, ExpertHost
from .meter import SavedBytes
from .layout import WireLayout
from .owner import Owner

OPTIONS = {"noise_sigma": "float >= 0: Gaussian noise std on hidden states sent to expert hosts",
           "expert_training": "'all' (default) or 'own': whether hosts train their experts on "
                              "other parties' tokens",
           "shuffle_rows": "bool: permute the rows of every (layer, host) message (private generator)",
           "dedup_rows": "bool: one row per (token, host), with a row_index tensor per (token, expert) pair",
           "pad_counts": "int >= 0 (0: off): pad every expert's row count to a multiple of N with dummy rows",
           "eval_traffic": "'plain' (default) or 'disguised': evaluation with the training kinds and meta"}
EVAL_TRAFFIC = ("plain", "disguised")


def validate_options(options):
    """Return the options with defaults filled in; raise ConfigError listing every problem."""
    options = dict(options or {})
    problems = [f"{k}: unknown option; valid: {', '.join(OPTIONS)}" for k in sorted(options)
                if k not in OPTIONS]
    sigma = options.get("noise_sigma", 0.0)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma < 0:
        problems.append(f"noise_sigma: must be a number >= 0 (got {sigma!r})")
    training = options.get("expert_training", "all")
    if training not in ("all", "own"):
        problems.append(f"expert_training: must be 'all' or 'own' (got {training!r})")
    for key in ("shuffle_rows", "dedup_rows"):
        if not isinstance(options.get(key, False), bool):
            problems.append(f"{key}: must be true or false (got {options[key]!r})")
    pad = options.get("pad_counts", 0)
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        problems.append(f"pad_counts: must be an integer >= 0 (got {pad!r})")
    traffic = options.get("eval_traffic", "plain")
    if traffic == "local":
        problems.append("eval_traffic: 'local' is not possible in pcmoe: a party holds only its share of "
                        "the experts, so its evaluation needs the other hosts; use 'disguised'")
    elif traffic not in EVAL_TRAFFIC:
        problems.append(f"eval_traffic: must be 'plain' or 'disguised' (got {traffic!r})")
    if problems:
        raise ConfigError("protocol.options", problems)
    return {"noise_sigma": float(sigma), "expert_training": training,
            "shuffle_rows": options.get("shuffle_rows", False), "dedup_rows": options.get("dedup_rows", False),
            "pad_counts": pad, "eval_traffic": traffic}


class PartyState:
    """What one party holds: its model (backbone + expert shard), optimizer, data stream,
    and its owner and host halves."""

    def __init__(self, ctx, index, n, options):
        self.name, self.index = party_name(index), index
        self.model = ctx.build_model().to(ctx.device)
        self.shards = shard_model(self.model, index, n)
        self.model.train()
        self.opt = make_optimizer(self.model.parameters(), ctx.training)
        self.tracker = ctx.tracker(self.name)
        self.tracker.attach([self.model], [self.opt])
        self.meter = SavedBytes([self.model])
        self.data = ctx.parties[index]
        self.gen = ctx.generator("site" if n == 1 else self.name)
        wire = WireLayout(options["shuffle_rows"], options["dedup_rows"], options["pad_counts"],
                          ctx.generator(self.name, "shuffle"), ctx.generator(self.name, "pad"))
        self.owner = Owner(index, n, self.model, self.meter, self.tracker, options["noise_sigma"],
                           ctx.generator(self.name, "noise"), record_route=ctx.record_route, wire=wire,
                           disguise_eval=options["eval_traffic"] == "disguised")
        self.host = ExpertHost(self.name, self.shards, self.opt, self.tracker, self.meter)
        self.host.train_remote = options["expert_training"] == "all"
        self.local_steps = 0


class PCMoE(Protocol):
    name = "pcmoe"
    server_roles = ("coordinator",)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.options = validate_options(ctx.options)
        family = ctx.scenario.model.family
        if family == "llama" and not ctx.scenario.model.path:
            raise ConfigError("model.family", [f"pcmoe needs a mixture-of-experts family (got {family!r}); "
                                               "valid: mixtral, olmoe, qwen2_moe"])
        self.n = len(ctx.parties)

    def roles(self):
        out = {party_name(i): self.party(i) for i in range(self.n)}
        out["coordinator"] = self.coordinator()
        return out

    def make_party(self, i):
        return PartyState(self.ctx, i, self.n, self.options)

    def schedule(self):
        """[(global step, party index, round)]: randomized round-robin, a fresh permutation
        of the parties per round, drawn from the coordinator's own generator."""
        gen = self.ctx.generator("coordinator", "schedule")
        out, rnd = [], 0
        while len(out) < self.ctx.training.steps:
            for i in torch.randperm(self.n, generator=gen).tolist():
                if len(out) < self.ctx.training.steps:
                    out.append((len(out), i, rnd))
            rnd += 1
        return out

    def party_batches(self, i):
        return sum(1 for _, j, _ in self.schedule() if j == i)

    # -- coordinator ---------------------------------------------------------------------
    def coordinator(self):
        """Gives each party its turns of :meth:`schedule`, evaluates every party at eval steps."""
        ctx, tr = self.ctx, self.ctx.training
        mem = ctx.tracker("coordinator")
        mem.attach()
        for step, i, rnd in self.schedule():
            who = party_name(i)
            yield Send(who, Message(kind="turn", step=step, meta={"party": who, "round": rnd}))
            yield Recv(src=who, kind="done")
            if is_eval_step(step, tr):
                for j in range(self.n):
                    yield Send(party_name(j), Message(kind="eval_turn", step=step))
                    yield Recv(src=party_name(j), kind="eval_done")
        for j in range(self.n):
            yield Send(party_name(j), Message(kind="stop", step=tr.steps))

    # -- party ---------------------------------------------------------------------------
    def party(self, i, state=None):
        """Serve expert requests until ``stop``; train or evaluate when given the turn."""
        st = state or self.make_party(i)
        while True:
            msg = yield Recv()
            if msg.kind in REQUESTS:
                yield Send(msg.src, st.host.serve(msg))
            elif msg.kind == "turn":
                st.host.finalize()
                yield from self.train_step(st, msg.step)
                yield Send(msg.src, Message(kind="done", step=msg.step))
            elif msg.kind == "eval_turn":
                st.host.finalize()
                yield from self.evaluate(st, msg.step)
                yield Send(msg.src, Message(kind="eval_done", step=msg.step))
            elif msg.kind == "stop":
                st.host.finalize()
                return
            else:
                raise ProtocolError(f"{st.name}: unexpected message {msg.kind!r} from {msg.src}")

    def train_step(self, st, step):
        """Generator: one global step on one local mini-batch of party ``st``."""
        ctx, tr = self.ctx, self.ctx.training
        ids = st.data.sample(tr.batch_size, st.gen).to(ctx.device)
        ctx.record_truth(st.name, step, ids)
        st.meter.reset()
        p = yield from st.owner.forward(ids, step, train=True)
        loss = yield from st.owner.backward(p, ids, step)
        st.opt.step()
        st.tracker.update_state()
        st.opt.zero_grad(set_to_none=True)
        st.meter.reset()
        st.local_steps += 1
        yield Log({"event": "train", "role": st.name, "party": st.name, "step": step, "loss": loss,
                   "tokens": ids.numel(), "local_step": st.local_steps - 1,
                   "local_pairs": p.local_pairs, "remote_pairs": p.remote_pairs})

    def evaluate(self, st, step):
        """Generator: held-out loss of party ``st`` on its own eval set, routed like training
        (same formula as :func:`parties.base.eval_loss`)."""
        tr = self.ctx.training
        total, count = 0.0, 0
        for ids in st.data.eval_batches(tr.batch_size, tr.eval_batches):
            ids = ids.to(self.ctx.device)
            p = yield from st.owner.forward(ids, step, train=False)
            logits = p.logits[:, :-1]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                reduction="sum").item()
            count += ids[:, 1:].numel()
        yield Log({"event": "eval", "role": st.name, "party": st.name, "step": step,
                   "eval_loss": total / max(count, 1)})


class PCMoENoSharing(PCMoE):
    """``pcmoe_no_sharing``: the ablation -- PC-MoE with ``expert_training: own`` (hosts never
    train their experts on other parties' tokens).  As a baseline of a PC-MoE scenario it
    takes the scenario's PC-MoE options (e.g. ``noise_sigma``) with that one changed."""

    name = "pcmoe_no_sharing"

    def __init__(self, ctx):
        sc = ctx.scenario
        base = sc.protocol.options if sc.protocol.name in ("pcmoe", self.name) else {}
        super().__init__(ctx)
        self.options = validate_options({**base, "expert_training": "own"})
