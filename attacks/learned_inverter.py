"""Learned inversion: a model trained on public text maps captured hidden states to tokens.

After BiSR's learning-based attack (SIP): Chen, Ma, Wang, Ding, Ji, "Unveiling the
Vulnerability of Private Fine-Tuning in Split-Based Frameworks for Large Language
Models: A Bidirectionally Enhanced Attack", CCS 2024, https://arxiv.org/abs/2409.00960.

Threat model: a receiver of hidden states that knows the layers that produced them only
as the shared starting checkpoint (the sender may have trained them since) and has
public auxiliary text from the same domain (:meth:`AdversaryView.aux_text`).  It passes
the auxiliary text through its own copy of those layers, trains an inverter (hidden
state -> token logits) on the pairs, and applies it to what it captured.  No per-batch
optimisation, so it costs one forward pass per captured state, and it transfers to
states from layers that drifted from the checkpoint -- the setting of PC-MoE, where a
host sees states from another party's backbone that started from the same checkpoint.

Sites (what the inverter is trained on, with the attacker's init copy):

* ``split`` ``act`` (server): the output of blocks ``0 .. cut-1``;
* ``pcmoe`` ``expert_fwd`` (the expert host, party-j, of party-i's tokens): layer l's
  expert input, the post-attention-norm hidden state; one inverter per layer; the
  messages carry no token positions, so each message is scored as a set
  (:data:`attacks.inversion_common.MOE_NOTE`);
* ``privatelora`` (cloud): layer l's ``A·x`` (q, k, v concatenated, 3r numbers per
  token) -- the cloud knows its A (re-derived as in :mod:`attacks.lora_m_recovery`), so it
  trains on ``x_aux A``; layer 0 by default (``layer`` picks another; deeper layers need
  a pass with M = 0 to re-derive A, which step 0 and the base evaluation provide).

Drift.  The victim trains its layers, so its states move away from the checkpoint's (on
pcmoe-4party, 100 steps, an inverter trained on checkpoint states alone falls from 0.98
to ~0.35 routed-token accuracy at layer 1).  The attacker knows the public training
recipe, so it also fine-tunes its copy on the auxiliary text and trains the inverter on
the states of several snapshots (``simulate_steps``; by default the checkpoint and 1/4,
1/2 and all of one party's updates, :func:`default_simulation`) -- a stand-in for the
victim's own fine-tuning on private text of the same domain (~0.6 there).

Inverters (``arch``): ``mlp`` (per token: standardised input, two GELU layers) or
``transformer`` (one bidirectional encoder layer over a captured sequence; not for
PC-MoE rows).  ``noise`` adds Gaussian noise (x the feature std) while training, for
robustness to drifted or noised states.

    python -m attacks run runs/<pcmoe run> --attack learned-inverter
"""
import copy
import logging
import time

import torch
from torch import nn

from parties.base import make_optimizer
from parties.privatelora.lowrank import PROJECTIONS
from testbed.errors import ConfigError
from testbed.scenario import TrainingCfg

from .base import Attack, ThreatModel
from .inversion_common import (Capture, attacker_model, attention_inputs, aux_rows, batched, captures,
                               moe_inputs, moe_reconstruction, sequence_reconstructions, split_states)
from .lora_m_recovery import lora_passes, recover_a
from .tag import torch_threads

log = logging.getLogger(__name__)


class Inverter(nn.Module):
    """Hidden state(s) -> token logits.  ``arch`` ``mlp``: [..., F] -> [..., V] per token;
    ``transformer``: [B, T, F] -> [B, T, V] with one encoder layer over the sequence."""

    def __init__(self, features, vocab, hidden, arch, mean, std, max_len=0):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.arch = arch
        self.inp = nn.Sequential(nn.Linear(features, hidden), nn.GELU())
        if arch == "transformer":
            self.pos = nn.Parameter(torch.zeros(max_len, hidden))
            self.mix = nn.TransformerEncoderLayer(hidden, 4, 2 * hidden, dropout=0.0, batch_first=True)
        else:
            self.mix = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU())
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x):
        h = self.inp((x - self.mean) / self.std)
        if self.arch == "transformer":
            h = h + self.pos[: h.shape[1]]
        return self.out(self.mix(h))


def train_inverter(feats, labels, vocab, arch="mlp", hidden=256, epochs=8, lr=2e-3, noise=0.0,
                   batch=256, seed=0):
    """Fit an :class:`Inverter` on ``feats`` ([N, F] for ``mlp``, [N, T, F] for
    ``transformer``) and ``labels`` ([N] / [N, T]); returns it in eval mode with the
    final training accuracy in ``.train_accuracy``."""
    flat = feats.reshape(-1, feats.shape[-1])
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    if arch == "mlp":
        feats, labels = flat, labels.reshape(-1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Inverter(feats.shape[-1], vocab, hidden, arch, mean, std,
                       feats.shape[1] if arch == "transformer" else 0)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    net.train()
    for ep in range(epochs):
        order = torch.randperm(len(feats), generator=gen)
        total = 0.0
        for i in range(0, len(feats), batch):
            idx = order[i:i + batch]
            x = feats[idx]
            if noise > 0:
                x = x + noise * std * torch.randn(x.shape, generator=gen)
            loss = nn.functional.cross_entropy(net(x).reshape(-1, vocab), labels[idx].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        log.debug("inverter epoch %d loss %.4f", ep, total / len(feats))
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(feats[i:i + 1024]).argmax(-1) for i in range(0, len(feats), 1024)])
    net.train_accuracy = float((pred == labels).float().mean())
    return net


def simulated_training(model, aux, training, steps, seed=0):
    """Copies of ``model`` fine-tuned on the auxiliary rows for each count in ``steps``
    (full-model LM loss, the public optimizer, batch size and learning rate of
    ``training`` -- the public config's section).  A stand-in for the drift of the
    victim's layers away from the checkpoint while it trains on private text of the
    same domain; ``0`` is the checkpoint itself."""
    cfg = TrainingCfg(**training)
    work = copy.deepcopy(model).train()
    work.requires_grad_(True)
    opt = make_optimizer(work.parameters(), cfg)
    gen = torch.Generator().manual_seed(seed)
    out, done = [], 0
    for target in steps:
        while done < target:
            ids = aux[torch.randint(len(aux), (cfg.batch_size,), generator=gen)]
            work(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
        out.append(copy.deepcopy(work).eval().requires_grad_(False))
    return out


def default_simulation(protocol, config):
    """Fine-tuning steps to simulate by default: the checkpoint and 1/4, 1/2 and all of
    the updates one party's layers get in the run (PC-MoE: a party's backbone steps on
    its own turns only, ``steps / parties`` of them); PrivateLoRA's stack is frozen: [0]."""
    if protocol == "privatelora":
        return [0]
    n = config["training"]["steps"]
    if protocol == "pcmoe":
        n = -(-n // config["parties"]["count"])
    return sorted({0, n // 4, n // 2, n})


def fingerprint(model):
    """A cheap identity for a checkpoint (trained inverters are reused only on the same one)."""
    return tuple(round(float(p.detach().double().sum()), 6) for p in model.parameters())


def predict(net, states):
    """Token ids and their probability for ``states`` (shape as the inverter expects)."""
    with torch.no_grad():
        p = torch.softmax(net(states), -1).max(-1)
    return p.indices, p.values


class LearnedInverter(Attack):
    """Train hidden state -> token on public text through the init layers; apply to captures."""

    name = "learned-inverter"
    threat_model = ThreatModel(
        observers=("server", "cloud", "party-*", "wire"),
        knowledge=frozenset({"config", "tokenizer", "init_model", "aux_text"}),
        summary="receiver of hidden states (split server, PC-MoE expert host, PrivateLoRA cloud) "
                "with the starting checkpoint and public text of the same domain")
    targets = {"split": ("act",), "pcmoe": ("expert_fwd",), "privatelora": ("embed", "act_up")}
    options = {"arch": "mlp", "hidden": 256, "epochs": 8, "lr": 2e-3, "noise": 0.0,
               "aux_records": 300, "simulate_steps": None, "layer": None, "seed": 0, "threads": 1,
               "steps": None, "max_batches": 0}

    def run(self, view, arch="mlp", hidden=256, epochs=8, lr=2e-3, noise=0.0, aux_records=300,
            simulate_steps=None, layer=None, seed=0, threads=1, steps=None, max_batches=0):
        """``arch``: ``mlp`` or ``transformer``; ``hidden``/``epochs``/``lr``/``noise``: the
        inverter and its training; ``aux_records``: public records to train on;
        ``simulate_steps``: train on the states of the checkpoint fine-tuned on the aux text
        for each of these many steps (:func:`simulated_training`; [0]: the checkpoint only;
        None: :func:`default_simulation` from the public config);
        ``layer``: which layer's states (PC-MoE: default every layer; PrivateLoRA: default 0);
        ``steps``/``max_batches``: which captured batches to attack."""
        problems = []
        if arch not in ("mlp", "transformer"):
            problems.append(f"arch: expected 'mlp' or 'transformer' (got {arch!r})")
        elif arch == "transformer" and view.protocol == "pcmoe":
            problems.append("arch: 'transformer' needs sequences; PC-MoE hosts see unordered rows (use 'mlp')")
        cfg = view.config()
        if simulate_steps is None:
            simulate_steps = default_simulation(view.protocol, cfg)
        if not simulate_steps or any(not isinstance(s, int) or s < 0 for s in simulate_steps):
            problems.append(f"simulate_steps: expected a non-empty list of integers >= 0 (got {simulate_steps!r})")
        elif view.protocol == "privatelora" and list(simulate_steps) != [0]:
            problems.append("simulate_steps: PrivateLoRA's cloud stack is frozen; only [0] applies")
        if problems:
            raise ConfigError(f"attacks.{self.name}.options", problems)
        model = attacker_model(view)
        aux = aux_rows(view, cfg["training"]["seq_len"], aux_records)
        train = dict(vocab=model.config.vocab_size, arch=arch, hidden=hidden, epochs=epochs, lr=lr,
                     noise=noise, seed=seed)
        with torch_threads(threads):
            models = self._snapshots(model, aux, cfg, sorted(set(simulate_steps)), seed)
            if view.protocol == "pcmoe":
                return self._pcmoe(view, models, aux, train, layer, steps, max_batches)
            if view.protocol == "split":
                caps = captures(view, "act", "act", steps, max_batches)
                nets = {k: self._fit(lambda m, ids, k=k: split_states(m, ids, k), models, aux, train, ("split", k))
                        for k in {int(c.meta["layer"]) for c in caps}}
                return self._sequences(caps, lambda c: nets[int(c.meta["layer"])], arch)
            return self._privatelora(view, model, aux, train, layer or 0, steps, max_batches)

    def _snapshots(self, model, aux, cfg, simulate_steps, seed):
        """The attacker's models to train on, cached per instance (see :meth:`_fit`)."""
        cache = self.__dict__.setdefault("_model_cache", {})
        key = (fingerprint(model), tuple(simulate_steps), aux.shape, int(aux.sum()), seed)
        if key not in cache:
            t0 = time.perf_counter()
            cache[key] = simulated_training(model, aux, cfg["training"], simulate_steps, seed)
            self.shared_seconds += time.perf_counter() - t0
        return cache[key]

    def _fit(self, site, models, aux, train, key):
        """The inverter for one site (``site(model, ids) -> states``) over every model, trained
        once per attack instance: the runner plays every observer with the same instance,
        and they share checkpoint and aux text."""
        cache = self.__dict__.setdefault("_net_cache", {})
        key = (key, tuple(fingerprint(m) for m in models), tuple(sorted(train.items())), aux.shape,
               int(aux.sum()))
        if key not in cache:
            t0 = time.perf_counter()
            feats = torch.cat([batched(lambda ids, m=m: site(m, ids), aux) for m in models])
            cache[key] = train_inverter(feats, aux.repeat(len(models), 1), **train)
            self.shared_seconds += time.perf_counter() - t0
            log.info("learned-inverter %s: %d aux tokens x %d models, train accuracy %.3f", key[0],
                     aux.numel(), len(models), cache[key].train_accuracy)
        return cache[key]

    @staticmethod
    def _sequences(caps, net_of, arch, extra=None):
        out = []
        for cap in caps:
            net = net_of(cap)
            states = cap.states if arch == "transformer" else cap.states.reshape(-1, cap.states.shape[-1])
            ids, prob = predict(net, states)
            recs = sequence_reconstructions(cap, ids.view(cap.states.shape[:-1]), arch=arch,
                                            aux_train_accuracy=net.train_accuracy, **(extra or {}))
            for rec, p in zip(recs, prob.view(cap.states.shape[:-1])):
                rec.meta["mean_confidence"] = float(p.mean())
                out.append(rec)
        return out

    def _pcmoe(self, view, models, aux, train, layer, steps, max_batches):
        caps = captures(view, "expert_fwd", "hidden", steps, max_batches, party_key="origin")
        nets, out = {}, []
        for cap in caps:
            lay = int(cap.meta["layer"])
            if layer is not None and lay != layer:
                continue
            if lay not in nets:
                nets[lay] = self._fit(lambda m, ids: moe_inputs(m, ids, lay), models, aux, train, ("pcmoe", lay))
            ids, prob = predict(nets[lay], cap.states)
            out.append(moe_reconstruction(cap, ids, aux_train_accuracy=nets[lay].train_accuracy,
                                          confidence=[round(float(p), 4) for p in prob]))
        return out

    def _privatelora(self, view, model, aux, train, layer, steps, max_batches):
        passes = lora_passes(view)
        a, _ = recover_a(model, passes, layer)

        def site(m, ids):
            return torch.cat([attention_inputs(m, layer, ids).double() @ a[p] for p in PROJECTIONS], -1).float()

        net = self._fit(site, [model], aux, train, ("privatelora", layer, float(sum(t.sum() for t in a.values()))))
        caps = []
        for p in passes:
            if p.mode != "train" or (steps is not None and p.step not in steps) or layer >= len(p.down):
                continue
            if max_batches and len(caps) >= max_batches:
                break
            states = torch.cat([p.down[layer][name] for name in PROJECTIONS], -1)
            caps.append(Capture(view.protocol, p.party, p.step, states, {"layer": layer}, p.seq))
        return self._sequences(caps, lambda _c: net, train["arch"], {"site": "A_x"})


ATTACK = LearnedInverter
