"""Exposure of each planted canary under the models an observer ends up holding.

Carlini, Liu, Erlingsson, Kos, Song, "The Secret Sharer: Evaluating and Testing
Unintended Neural Network Memorization", USENIX Security 2019, arXiv 1802.08232.

The exposure of a canary ``s[r]`` among the candidates ``R`` of its format is
``log2 |R| - log2 rank(s[r])``, the rank by the model's log-perplexity of the canary's
sentence (prefix + value).  ``|R|`` is estimated by sampling: ``candidates`` random values
of the same field from the data generator (its value formats); the canary's rank among
them and itself gives ``exposure = log2(candidates + 1) - log2(rank)`` -- the maximum,
``log2(candidates + 1)``, means the canary is the model's most likely value.

Held models (:func:`held_models`) come from the adversary view only: in FedSGD and
FedAvg the coordinator and every party hold the global model, which an observer of the
broadcast updates rebuilds exactly (the starting checkpoint with every update replayed
through the public optimizer, or with every averaged delta added).  The reference is the
shared starting checkpoint, which never saw any canary: exposure that rises above it is
what the collaboration's model memorised.  Scoring needs the canary values, so this
module reads ``truth/canaries.json`` -- like :mod:`attacks.score`, never handing it to an
attack.

    python -m attacks exposure runs/<fedsgd run> [--candidates 1000]
"""
import json
import logging
import math
import random
from pathlib import Path

import torch

from .view import WIRE, AdversaryView

log = logging.getLogger(__name__)

# protocol -> (observer who holds the global model, update kind, how updates apply)
GLOBAL_MODEL = {"fedsgd": ("coordinator", "update", "optimizer"),
                "fedavg": ("coordinator", "update", "add")}


def held_models(view):
    """{label: model} the view's observer ends up holding, rebuilt from its traffic;
    {} for protocols whose held models the capture cannot rebuild."""
    spec = GLOBAL_MODEL.get(view.protocol)
    if spec is None:
        return {}
    _, kind, how = spec
    steps = sorted({m.step for m in view.messages(kind=kind)})
    if not steps:
        return {}
    if how == "optimizer":
        from .bag_of_tokens import StepWeights
        weights = StepWeights(view, update_kind=kind)
        model = weights.at(steps[-1] + 1)
        if model is None:
            return {}
    else:
        model = view.init_model()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for m in view.messages(kind=kind):
                for name in m.names:
                    hit = [n for n in params if n == name or n.endswith("." + name) or name.endswith("." + n)]
                    if len(hit) == 1:
                        params[hit[0]].add_(m.tensor(name).to(params[hit[0]].dtype))
    return {f"global model after step {steps[-1]}": model.eval()}


@torch.no_grad()
def log_perplexity(model, tok, prefix, values, batch=256):
    """Sum of -log p over each value's tokens given ``prefix`` (nats), one per value."""
    from parties.data.tokenizer import EOS_ID
    head = tok.encode(prefix, add_special_tokens=False).ids
    out = []
    for i in range(0, len(values), batch):
        seqs = [tok.encode(f"{prefix} {v}", add_special_tokens=False).ids for v in values[i:i + batch]]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), EOS_ID, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)
        for r, s in enumerate(seqs):
            # the value's tokens: everything after the prefix's tokens (BPE may merge the
            # boundary; start at the first position where the encodings differ)
            k = next((j for j, (a, b) in enumerate(zip(head, s)) if a != b), min(len(head), len(s)))
            k = max(k, 1)
            out.append(-sum(float(logp[r, j - 1, s[j]]) for j in range(k, len(s))))
    return out


def candidates_for(canary, n, seed=0):
    """``n`` distinct random values of the canary's field, none equal to the canary."""
    from parties.data.generator import _draw_value
    rng = random.Random(f"exposure/{canary['id']}/{seed}")
    out, seen = [], {canary["value"]}
    for _ in range(50 * n):
        v = _draw_value(canary["field"], rng, 0)
        if v not in seen:
            seen.add(v)
            out.append(v)
            if len(out) == n:
                break
    return out


def exposure(model, tok, canary, candidates):
    """(exposure in bits, rank) of ``canary`` among ``candidates`` under ``model``."""
    scores = log_perplexity(model, tok, canary["prefix"], [canary["value"]] + candidates)
    rank = 1 + sum(1 for s in scores[1:] if s < scores[0])
    return math.log2(len(candidates) + 1) - math.log2(rank), rank


def run_exposure(run_path, candidates=1000, seed=0, write=True):
    """Exposure of every canary of ``run_path`` under the reference (starting checkpoint)
    and under each model its observers hold; writes ``attacks/exposure.json``."""
    run_path = Path(run_path)
    canaries = json.loads((run_path / "truth" / "canaries.json").read_text()) \
        if (run_path / "truth" / "canaries.json").is_file() else []
    view = AdversaryView(run_path, WIRE)
    tok = view.tokenizer()
    observers = {GLOBAL_MODEL[view.protocol][0]: ["every party", WIRE]} if view.protocol in GLOBAL_MODEL else {}
    models = {"reference: starting checkpoint (never saw a canary)": ("-", view.init_model())}
    for label, m in held_models(view).items():
        models[label] = (", ".join([o for o in observers] + sum(observers.values(), [])), m)
    trained = _trained(run_path, canaries)
    out = {"protocol": view.protocol, "candidates": candidates, "max_bits": math.log2(candidates + 1),
           "canaries": [{"id": c["id"], "field": c["field"], "trained": c["id"] in trained} for c in canaries],
           "models": []}
    from tqdm import tqdm
    cands = {c["id"]: candidates_for(c, candidates, seed) for c in canaries}
    for label, (who, model) in tqdm(models.items(), desc="exposure", unit="model", leave=False):
        row = {"model": label, "held_by": who, "exposure": {}, "rank": {}}
        for c in canaries:
            bits, rank = exposure(model, tok, c, cands[c["id"]])
            row["exposure"][c["id"]], row["rank"][c["id"]] = bits, rank
        out["models"].append(row)
    if view.protocol not in GLOBAL_MODEL:
        out["note"] = f"{view.protocol}: the models its observers hold are not rebuilt from the capture"
    if write:
        p = run_path / "attacks" / "exposure.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(out, indent=2))
        out["path"] = str(p)
    return out


def _trained(run_path, canaries):
    """Canary ids whose record some party trains on (truth/partition.json)."""
    p = run_path / "truth" / "partition.json"
    if not p.is_file():
        return set()
    train = {rid for part in json.loads(p.read_text()).values() for rid in part.get("train", [])}
    return {c["id"] for c in canaries if set(c["record_ids"]) & train}


def format_exposure(out):
    """The printed table: model x canary exposure (bits), rank in parentheses."""
    ids = [c["id"] for c in out["canaries"]]
    head = ["model", "held by"] + [f"{i}{'' if c['trained'] else ' (untrained)'}"
                                   for i, c in zip(ids, out["canaries"])]
    rows = [[m["model"], m["held_by"]] + [f"{m['exposure'][i]:.2f} ({m['rank'][i]})" for i in ids]
            for m in out["models"]]
    widths = [max(len(str(r[k])) for r in [head] + rows) for k in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head] + rows]
    return "\n".join(lines + [f"exposure in bits of {out['max_bits']:.2f} max "
                              f"({out['candidates']} random candidates per canary); (rank)"])
