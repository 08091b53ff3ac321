"""A shared starting checkpoint that is already a language model: pre-training on public text.

Fine-tuning from a shared pre-trained checkpoint is what PC-MoE (arXiv 2506.02965) and
PrivateLoRA do; a random init makes every protocol look alike.  A scenario's ``init:
{pretrain: {...}}`` section asks the runner for such a base: the scenario's model is
pre-trained on *public* text -- generated records of kinds no party holds (by default),
drawn with a seed of their own, so no party's records are among them -- with a
tokenizer trained on the same public text, and both are cached under
``<cache_dir>/<config hash>/`` (``base.json`` records the settings, the hash and the
final loss).  Every protocol of a run, and every seed of a multi-seed run, starts from
the same cached checkpoint; a second run with the same settings pre-trains nothing.

``pretrain(model_cfg, settings, out_dir)`` is the training itself (also used by
``python -m parties.privatelora_base`` for PrivateLoRA's frozen base).
"""
import hashlib
import json
import logging
import random
from pathlib import Path

import torch

from testbed.scenario import CanaryCfg

from parties.data import KINDS, encode_records, generate_records, train_tokenizer
from parties.data.dataset import EpochSampler, pack
from parties.models import build_model

log = logging.getLogger(__name__)
PUBLIC_SEED_OFFSET = 7919   # public text is drawn with seed + this: never the private records


def public_kinds(scenario):
    """Record kinds no party holds (all kinds if the parties hold every one)."""
    return [k for k in KINDS if k not in scenario.data.kinds] or list(KINDS)


def settings_key(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def pretrain(model_cfg, settings, out_dir, progress=False):
    """Pre-train a fresh ``model_cfg`` model on public records into ``out_dir``.

    ``settings``: kinds, records, steps, batch_size, lr, seq_len, seed, vocab_size.
    Writes the model (``save_pretrained``), ``tokenizer.json`` and ``base.json``; returns
    the ``base.json`` record.  Batches are drawn in epochs without replacement; the
    learning rate follows a cosine schedule to zero."""
    s = settings
    recs, _ = generate_records(s["kinds"], s["records"], random.Random(s["seed"] + PUBLIC_SEED_OFFSET),
                               CanaryCfg(count=0))
    tok = train_tokenizer([r["text"] for r in recs], s["vocab_size"])
    rows = pack(encode_records(tok, recs), s["seq_len"])
    model = build_model(model_cfg.model_copy(update={"path": None}), tok.get_vocab_size(), s["seed"])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s["steps"])
    sampler = EpochSampler(rows, torch.Generator().manual_seed(s["seed"] + PUBLIC_SEED_OFFSET))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=s["steps"], desc="pre-train base", unit="step", dynamic_ncols=True)
    loss = float("nan")
    for _ in range(s["steps"]):
        ids = sampler(s["batch_size"])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.item()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    if bar is not None:
        bar.close()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    record = {"key": settings_key(settings), **settings, "public_rows": len(rows),
              "epochs": sampler.epoch + 1, "final_train_loss": loss}
    (out / "base.json").write_text(json.dumps(record, indent=2))
    return record


def init_settings(scenario):
    """The settings (and so the cache key) of a scenario's ``init.pretrain`` section."""
    p = scenario.init.pretrain
    bad = [k for k in p.kinds or [] if k not in KINDS]
    if bad or p.kinds == []:
        from testbed.errors import ConfigError
        raise ConfigError("init.pretrain.kinds", [f"unknown kind(s) {bad or p.kinds!r}; valid: {', '.join(KINDS)}"])
    return {"model": scenario.model.model_dump(exclude={"path"}),
            "kinds": list(p.kinds) if p.kinds else public_kinds(scenario),
            "records": p.records, "steps": p.steps, "batch_size": p.batch_size, "lr": p.lr,
            "seq_len": scenario.training.seq_len, "seed": p.seed,
            "vocab_size": scenario.data.tokenizer.vocab_size}


def pretrained_init(scenario, base_dir=".", progress=False):
    """-> (checkpoint directory, base.json record) for the scenario's ``init.pretrain``,
    pre-training only when the cache has no checkpoint with the same settings."""
    settings = init_settings(scenario)
    key = settings_key(settings)
    out = Path(base_dir) / scenario.init.pretrain.cache_dir / key
    meta = out / "base.json"
    if meta.is_file() and (out / "config.json").is_file():
        record = json.loads(meta.read_text())
        if record.get("key") == key:
            log.info("init: pre-trained checkpoint %s reused", out)
            return out, record
    log.info("init: pre-training %d steps on public kinds %s into %s", settings["steps"],
             ", ".join(settings["kinds"]), out)
    return out, pretrain(scenario.model, settings, out, progress=progress)


def starting_point(scenario, base_dir=".", progress=False):
    """-> (tokenizer or None, model config to build, base.json record or None): where a
    run's shared starting checkpoint comes from (the embedded runner and the container
    preparation both call this).  Without ``init.pretrain``: the scenario's own model and
    tokenizer settings."""
    if scenario.init.pretrain is None:
        return None, scenario.model, None
    from parties.data.tokenizer import load_tokenizer
    path, record = pretrained_init(scenario, base_dir, progress=progress)
    return (load_tokenizer(path / "tokenizer.json"),
            scenario.model.model_copy(update={"path": str(path)}), record)
