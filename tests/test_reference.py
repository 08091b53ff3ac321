"""Every multi-party protocol against an independent single-process reference of its schedule.

Each protocol runs for several steps with two parties in the SimPy engine (every message
through the wire codec).  The batches each party trained on come from the run's truth
records (who trained on which rows at which step); the reference replays that schedule
in one process with ordinary autograd on full model copies -- no roles, no messages, no
protocol code -- and must give the same train loss at every step and the same final
held-out loss per party.  Plain SGD with a large learning rate makes every update
visible in the next step's loss, so a collaboration that is broken (hosts' expert
updates dropped, the average skipped, the cut gradient detached) fails these tests.
"""
import copy
import random
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from parties.base import RoleContext
from parties.data.dataset import prepare_data
from parties.models import build_model
from parties.registry import get_protocol
from testbed.engine.memory import MemoryTracker
from testbed.engine.sim import SimEngine
from testbed.run.runner import endpoint_configs

from conftest import tiny_scenario

REPO = Path(__file__).resolve().parents[1]
STEPS, LR, ATOL = 6, 0.5, 2e-5


def scenario(protocol, options=None, **model):
    return tiny_scenario(
        protocol={"name": protocol, "options": options or {}}, baselines=[],
        model={"num_layers": 2, **model}, parties={"count": 2},
        training={"steps": STEPS, "optimizer": "sgd", "lr": LR, "batch_size": 2, "seq_len": 16,
                  "eval_every": STEPS, "eval_batches": 1})


def run(sc, cache):
    """Run ``sc``'s protocol; return (data, init model, truth {(step, party): ids}, logs)."""
    data = prepare_data(sc, REPO, cache)
    init = build_model(sc.model, data.vocab_size, sc.seed)
    truth = {}
    ctx = RoleContext(scenario=sc, vocab_size=data.vocab_size, parties=data.parties,
                      device=torch.device("cpu"), build_model=lambda: copy.deepcopy(init),
                      protocol_name=sc.protocol.name,
                      record_truth=lambda party, step, ids: truth.__setitem__((step, party), ids.clone()))
    proto = get_protocol(sc.protocol.name)(ctx)
    ctx.trackers = {r: MemoryTracker(r) for r in proto.role_names()}
    logs = []
    SimEngine(sc.protocol.name, endpoint_configs(sc, proto.role_names()), random.Random(0),
              on_log=logs.append, compute_mode="none").run(proto.roles())
    return data, init, truth, logs


def eval_loss(forward, batches):
    total, n = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            logits = forward(ids)[:, :-1]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum").item()
            n += ids[:, 1:].numel()
    return total / n


def check(logs, ref_losses, ref_evals):
    """The protocol's train losses per (step, party) and last eval per party equal the reference."""
    got = {(r["step"], r["party"]): r["loss"] for r in logs if r.get("event") == "train"}
    assert set(got) == set(ref_losses)
    for key in sorted(ref_losses):
        assert got[key] == pytest.approx(ref_losses[key], abs=ATOL), f"train loss at (step, party) {key}"
    evals = {r["party"]: r["eval_loss"] for r in logs if r.get("event") == "eval"}
    for party, v in ref_evals.items():
        assert evals[party] == pytest.approx(v, abs=ATOL), f"final eval loss of {party}"


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR)


def batches(data, i, sc):
    return data.parties[i].eval_batches(sc.training.batch_size, sc.training.eval_batches)


# -- PC-MoE ---------------------------------------------------------------------------------

def pcmoe_reference(sc, data, init, truth):
    """Party p: its own backbone and routers; expert e of every layer lives with party e mod n
    and is trained by every party's tokens routed to it (on its host's copy)."""
    n, E = sc.parties.count, sc.model.num_experts
    own_only = sc.protocol.name == "pcmoe_no_sharing"
    P = [copy.deepcopy(init) for _ in range(n)]
    opts = [sgd(m) for m in P]

    def params(p):
        out = dict(P[p].named_parameters())
        for l in range(sc.model.num_layers):
            for key in ("gate_up_proj", "down_proj"):
                rows = []
                for e in range(E):
                    w = getattr(P[e % n].model.layers[l].mlp.experts, key)[e]
                    rows.append(w.detach() if own_only and e % n != p else w)
                out[f"model.layers.{l}.mlp.experts.{key}"] = torch.stack(rows)
        return out

    losses = {}
    for (step, party) in sorted(truth):
        p, ids = int(party.split("-")[1]), truth[(step, party)]
        loss = functional_call(P[p], params(p), (), {"input_ids": ids, "labels": ids}).loss
        loss.backward()
        losses[(step, party)] = loss.item()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
    evals = {f"party-{p}": eval_loss(lambda ids, p=p: functional_call(P[p], params(p), (), {"input_ids": ids}).logits,
                                     batches(data, p, sc)) for p in range(n)}
    return losses, evals


@pytest.mark.parametrize("name", ["pcmoe", "pcmoe_no_sharing"])
def test_pcmoe_matches_the_single_process_reference(name, tmp_path):
    sc = scenario(name)
    data, init, truth, logs = run(sc, tmp_path)
    assert {p for _, p in truth} == {"party-0", "party-1"} and len(truth) == STEPS
    check(logs, *pcmoe_reference(sc, data, init, truth))


# -- FedAvg / FedSGD --------------------------------------------------------------------------

def fedavg_reference(sc, data, init, truth, local_steps):
    n, bs = sc.parties.count, sc.training.batch_size
    G = copy.deepcopy(init)
    weights = [len(data.parties[i].train) for i in range(n)]
    losses = {}
    for t in range(STEPS):
        deltas = []
        for i in range(n):
            local = copy.deepcopy(G)
            opt = sgd(local)
            ids_all, step_losses = truth[(t, f"party-{i}")], []
            for k in range(local_steps):
                ids = ids_all[k * bs:(k + 1) * bs]
                loss = local(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                step_losses.append(loss.item())
            losses[(t, f"party-{i}")] = sum(step_losses) / local_steps
            deltas.append({k: v.detach() - g for (k, v), g in zip(local.named_parameters(), G.parameters())})
        with torch.no_grad():
            for name, g in G.named_parameters():
                g.add_(sum(w * d[name] for w, d in zip(weights, deltas)) / sum(weights))
    evals = {f"party-{i}": eval_loss(lambda ids: G(input_ids=ids).logits, batches(data, i, sc)) for i in range(n)}
    return losses, evals


def fedsgd_reference(sc, data, init, truth):
    n = sc.parties.count
    G = copy.deepcopy(init)
    opt = sgd(G)
    losses = {}
    for t in range(STEPS):
        grads, rows = [], []
        for i in range(n):
            ids = truth[(t, f"party-{i}")]
            loss = G(input_ids=ids, labels=ids).loss
            grads.append(torch.autograd.grad(loss, list(G.parameters()), allow_unused=True))
            rows.append(ids.shape[0])
            losses[(t, f"party-{i}")] = loss.item()
        for j, p in enumerate(G.parameters()):
            p.grad = sum(w * (g[j] if g[j] is not None else torch.zeros_like(p))
                         for w, g in zip(rows, grads)) / sum(rows)
        opt.step()
        opt.zero_grad(set_to_none=True)
    evals = {f"party-{i}": eval_loss(lambda ids: G(input_ids=ids).logits, batches(data, i, sc)) for i in range(n)}
    return losses, evals


def test_fedavg_matches_the_single_process_reference(tmp_path):
    sc = scenario("fedavg", {"local_steps": 2})
    data, init, truth, logs = run(sc, tmp_path)
    check(logs, *fedavg_reference(sc, data, init, truth, 2))


def test_fedsgd_matches_the_single_process_reference(tmp_path):
    sc = scenario("fedsgd")
    data, init, truth, logs = run(sc, tmp_path)
    check(logs, *fedsgd_reference(sc, data, init, truth))


# -- split learning -----------------------------------------------------------------------------

def split_reference(sc, data, init, truth, cut):
    """Party i: embeddings and blocks below ``cut``; one server: the blocks above and the head,
    stepped after every party batch, parties in index order within a step."""
    n = sc.parties.count
    B = [copy.deepcopy(init) for _ in range(n)]
    S = copy.deepcopy(init)
    opts, sopt = [sgd(m) for m in B], sgd(S)

    def params(i):
        out = dict(S.named_parameters())
        for name, p in B[i].named_parameters():
            if name.startswith("model.embed_tokens.") or any(
                    name.startswith(f"model.layers.{l}.") for l in range(cut)):
                out[name] = p
        return out

    losses = {}
    for t in range(STEPS):
        for i in range(n):
            ids = truth[(t, f"party-{i}")]
            loss = functional_call(S, params(i), (), {"input_ids": ids, "labels": ids}).loss
            loss.backward()
            losses[(t, f"party-{i}")] = loss.item()
            for o in (sopt, opts[i]):
                o.step()
                o.zero_grad(set_to_none=True)
    evals = {f"party-{i}": eval_loss(lambda ids, i=i: functional_call(S, params(i), (), {"input_ids": ids}).logits,
                                     batches(data, i, sc)) for i in range(n)}
    return losses, evals


def test_split_matches_the_single_process_reference(tmp_path):
    # the router's aux loss is computed per side in split learning (not additive over
    # layers), so the reference is exact without it
    sc = scenario("split", {"cut_layer": 1}, router_aux_loss_coef=0.0)
    data, init, truth, logs = run(sc, tmp_path)
    check(logs, *split_reference(sc, data, init, truth, 1))
