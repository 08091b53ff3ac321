"""What FedSGD and FedAvg share: rounds, client sampling, weighted averaging, the coordinator.

Every party holds a full model copy built from the shared starting checkpoint; a
``coordinator`` role holds no model.  One training step is one round:

1. the coordinator samples ``clients_per_round`` parties (default: all) with its own
   torch.Generator and sends each selected party a header-only ``round`` message;
2. each selected party computes its local update on private mini-batches (subclass hook
   :meth:`Federated.local_update`) and sends it as one message (kind ``grad`` or
   ``delta``; tensors named by parameter name; meta ``party``, ``n_samples``, ``round``);
3. the coordinator averages the updates weighted by ``n_samples`` (in party order) and
   broadcasts the average to *every* party (kind ``update``);
4. every party applies the same average in the same way (:meth:`Federated.apply_update`),
   so all copies stay bit-for-bit equal, and at evaluation steps reports the model's
   held-out loss on its own eval set.

With a ``secagg`` defence (:mod:`parties.defences.secagg`) the parties first exchange
public keys through the coordinator (step -1), each sends its update pairwise-masked in
fixed point, and the coordinator recovers only the weighted mean.

Links may reorder messages (jitter), so a party buffers early ones by (kind, round).
A selected party logs one ``train`` record per round (loss, tokens, and under DP-SGD the
privacy spent), so ``training.steps`` counts rounds.
"""
import torch

from testbed.engine.codec import Message
from testbed.engine.effects import Log, Recv, Send
from testbed.errors import ConfigError, ProtocolError

from parties.base import Protocol, eval_records, is_eval_step, make_optimizer, party_name
from parties.defences import secagg
from .dp import dp_config, make_private

COORDINATOR = "coordinator"


def check_options(options, spec, n_parties):
    """Validate ``protocol.options`` against ``spec`` (name -> (check, default)).

    ``check(value, n_parties)`` returns a problem string or None.  Returns the options
    with defaults filled in; raises ConfigError listing every problem.
    """
    problems = [f"{k}: unknown option; valid: {', '.join(spec)}" for k in options if k not in spec]
    out = {}
    for k, (check, default) in spec.items():
        v = options.get(k, default)
        why = check(v, n_parties)
        if why:
            problems.append(f"{k}: {why} (got {v!r})")
        out[k] = v
    if problems:
        raise ConfigError("protocol.options", problems)
    return out


def check_clients(v, n):
    if v is None or v == "all":
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= n:
        return f"must be 'all' or an integer in 1..{n} (the party count)"
    return None


def sample_clients(gen, n, k):
    """``k`` distinct party indices out of ``n``, in increasing order (all when k == n)."""
    if k >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=gen)[:k].tolist())


def weighted_mean(updates):
    """``[(tensors, weight), ...]`` -> tensors averaged with weights normalised to sum 1."""
    total = float(sum(w for _, w in updates))
    if total <= 0:
        raise ProtocolError(f"weighted_mean: weights must sum to > 0 (got {total})")
    out = {}
    for tensors, w in updates:
        for name, t in tensors.items():
            term = t.float() * (w / total)
            out[name] = term if name not in out else out[name] + term
    return out


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())


def recv_any(stash, src, wanted):
    """Receive from ``src`` until one of ``wanted`` (kind, step) pairs is buffered; pop it."""
    while not any(w in stash for w in wanted):
        msg = yield Recv(src=src)
        stash[(msg.kind, msg.step)] = msg
    return next(stash.pop(w) for w in wanted if w in stash)


class Federated(Protocol):
    """Base of FedSGD and FedAvg. Subclasses set ``up_kind`` and the two hooks."""

    server_roles = (COORDINATOR,)
    up_kind = ""          # kind of the party -> coordinator message
    payload = ""          # what the broadcast average is (meta of ``update``)
    OPTIONS = {"clients_per_round": (check_clients, "all")}
    defence_options = ("dp_sgd", "secagg")

    def __init__(self, ctx):
        super().__init__(ctx)
        self.opts = check_options(self.given_options(ctx), self.OPTIONS, len(ctx.parties))
        k = self.opts["clients_per_round"]
        self.k = len(ctx.parties) if k in (None, "all") else k
        self.secagg = secagg.secagg_config(ctx)

    def given_options(self, ctx):
        """The ``protocol.options`` this protocol runs with (a variant may change some)."""
        return ctx.options

    def expected_train_logs(self):
        return self.ctx.training.steps * self.k

    # mini-batches a selected party trains on per round (FedAvg: local_steps)
    def batches_per_round(self):
        return 1

    def party_batches(self, i):
        """Rounds party ``i`` is selected in (the coordinator's draws, replayed) times
        :meth:`batches_per_round`."""
        gen, n = self.ctx.generator(COORDINATOR, "clients"), len(self.ctx.parties)
        rounds = sum(i in sample_clients(gen, n, self.k) for _ in range(self.ctx.training.steps))
        return rounds * self.batches_per_round()

    def roles(self):
        out = {party_name(i): self.party(i) for i in range(len(self.ctx.parties))}
        out[COORDINATOR] = self.coordinator()
        return out

    # -- coordinator -------------------------------------------------------------------
    def coordinator(self):
        ctx, n = self.ctx, len(self.ctx.parties)
        gen = ctx.generator(COORDINATOR, "clients")
        mem = ctx.tracker(COORDINATOR)
        mem.attach([], [])
        if self.secagg is not None:
            yield from self.relay_keys(n)
        for t in range(ctx.training.steps):
            selected = sample_clients(gen, n, self.k)
            names = [party_name(i) for i in selected]
            for name in names:
                yield Send(name, Message("round", step=t, meta={"round": t, "selected": names}))
            got = {}
            while len(got) < len(names):
                msg = yield Recv(kind=self.up_kind)
                if msg.step != t or msg.src not in names or msg.src in got:
                    raise ProtocolError(f"{COORDINATOR}: unexpected {msg.kind!r} from {msg.src} for "
                                        f"round {msg.step} while collecting round {t} from {names}")
                got[msg.src] = msg
            ordered = [got[name] for name in names]
            if self.secagg is not None:
                avg = secagg.unmask_mean([(m.tensors, m.meta["n_samples"]) for m in ordered],
                                         self.secagg.frac_bits)
            else:
                avg = weighted_mean([(m.tensors, m.meta["n_samples"]) for m in ordered])
            mem.add_activations(sum(tensor_bytes(m.tensors) for m in ordered) + tensor_bytes(avg))
            meta = {"round": t, "parties": names, "payload": self.payload,
                    "n_samples": sum(m.meta["n_samples"] for m in ordered)}
            for i in range(n):
                yield Send(party_name(i), Message("update", step=t, meta=meta, tensors=avg))

    def relay_keys(self, n):
        """Secure aggregation's setup: collect every party's public key, send all to all."""
        publics = {}
        while len(publics) < n:
            msg = yield Recv(kind=secagg.KEY)
            publics[msg.src] = msg.tensors["public"]
        keys = {p: publics[p] for p in sorted(publics)}
        for i in range(n):
            yield Send(party_name(i), Message(secagg.KEYS, step=-1, tensors=keys,
                                              meta={"parties": list(keys)}))

    # -- party ----------------------------------------------------------------------------
    def party(self, i):
        ctx, tr, me = self.ctx, self.ctx.training, party_name(i)
        model = ctx.build_model().to(ctx.device)
        model.train()
        opt = make_optimizer(model.parameters(), tr)
        state = {"i": i, "me": me, "model": model, "opt": opt, "mem": ctx.tracker(me),
                 "gen": ctx.generator(me), "data": ctx.parties[i], "private": None}
        state["mem"].attach([model], [opt])
        cfg = dp_config(ctx)
        if cfg is not None:
            state["private"] = make_private(model, opt, len(state["data"].train), tr.batch_size, cfg,
                                            generator=ctx.generator(me, "dp"))
        stash, masker = {}, None
        if self.secagg is not None:
            seed = torch.randint(0, 256, (32,), generator=ctx.generator(me, "secagg"), dtype=torch.uint8)
            masker = secagg.Masker(me, bytes(seed.tolist()), self.secagg.frac_bits)
            yield Send(COORDINATOR, Message(secagg.KEY, step=-1, tensors={
                "public": torch.frombuffer(bytearray(masker.public), dtype=torch.uint8)}))
            msg = yield from recv_any(stash, COORDINATOR, [(secagg.KEYS, -1)])
            masker.setup({p: bytes(t.tolist()) for p, t in msg.tensors.items()})
        for t in range(tr.steps):
            msg = yield from recv_any(stash, COORDINATOR, [("round", t), ("update", t)])
            if msg.kind == "round":
                tensors, meta, record = self.local_update(state, t)
                if masker is not None:
                    tensors = masker.mask(tensors, meta["n_samples"], t, msg.meta["selected"])
                    meta = {**meta, secagg.META: {"frac_bits": masker.frac_bits}}
                yield Send(COORDINATOR, Message(self.up_kind, step=t, tensors=tensors, meta={
                    "party": me, "round": t, **meta}))
                if state["private"] is not None:
                    record.update(state["private"].log_fields())
                yield Log({"event": "train", "role": me, "party": me, "step": t, **record})
                msg = yield from recv_any(stash, COORDINATOR, [("update", t)])
            self.apply_update(state, msg.tensors)
            state["mem"].update_state()
            if is_eval_step(t, tr):
                yield from eval_records(ctx, model, me, t, parties=[i])

    def local_update(self, state, t):
        """-> (tensors to send, extra meta incl. ``n_samples``, train-record fields)."""
        raise NotImplementedError

    def apply_update(self, state, tensors):
        """Apply the coordinator's average to this party's model (same on every party)."""
        raise NotImplementedError
