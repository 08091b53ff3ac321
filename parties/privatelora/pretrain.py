"""Build the public base model a PrivateLoRA scenario fine-tunes: pre-train on public text.

PrivateLoRA freezes the base model, so a randomly initialised one is useless as a
"frozen base".  This tool pre-trains the scenario's LLaMA on *public* text -- generated
records of the kinds the scenario's devices do not hold, drawn with another seed -- and
writes, into the scenario's ``model.path``:

* the model (``save_pretrained``; the runner loads it with ``from_pretrained`` and saves
  it as the run's ``public/init-model``, the checkpoint every party starts from),
* ``tokenizer.json`` trained on the same public text (point ``data.tokenizer.path`` at it),
* ``base.json``: what it was trained on, for how long, and its final loss.

It runs once and is skipped when ``base.json`` already records the same settings.

    python -m parties.privatelora_base scenarios/privatelora.yaml [--steps 300] [--force]
    python -m testbed run scenarios/privatelora.yaml
"""
import argparse
import hashlib
import json
import logging
import random
from pathlib import Path

import torch

from testbed.scenario import CanaryCfg, load_scenario

from parties.data import KINDS, encode_records, generate_records, train_tokenizer
from parties.data.dataset import pack
from parties.models import build_model

log = logging.getLogger(__name__)
PUBLIC_SEED_OFFSET = 7919   # public text is drawn with seed + this: never the private records


def public_kinds(scenario):
    """Record kinds no device holds (all kinds if the devices hold every one)."""
    return [k for k in KINDS if k not in scenario.data.kinds] or list(KINDS)


def build_base(scenario, out_dir, steps=300, records=600, batch_size=16, lr=3e-3, force=False,
               progress=False):
    """Pre-train ``scenario.model`` (family llama) on public text into ``out_dir``.

    Returns the ``base.json`` record (kinds, steps, final training loss, ...).
    """
    out = Path(out_dir)
    kinds = public_kinds(scenario)
    settings = {"model": scenario.model.model_dump(exclude={"path"}), "kinds": kinds,
                "records": records, "steps": steps, "batch_size": batch_size, "lr": lr,
                "seq_len": scenario.training.seq_len, "seed": scenario.seed,
                "vocab_size": scenario.data.tokenizer.vocab_size}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    meta_path = out / "base.json"
    if not force and meta_path.exists() and json.loads(meta_path.read_text()).get("key") == key:
        log.info("%s: base model up to date", out)
        return json.loads(meta_path.read_text())
    if scenario.model.family != "llama":
        raise ValueError(f"model.family: the PrivateLoRA base must be llama (got {scenario.model.family!r})")
    recs, _ = generate_records(kinds, records, random.Random(scenario.seed + PUBLIC_SEED_OFFSET),
                               CanaryCfg(count=0))
    tok = train_tokenizer([r["text"] for r in recs], scenario.data.tokenizer.vocab_size)
    rows = pack(encode_records(tok, recs), scenario.training.seq_len)
    model = build_model(scenario.model.model_copy(update={"path": None}), tok.get_vocab_size(),
                        scenario.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(scenario.seed + PUBLIC_SEED_OFFSET)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc="pre-train base", unit="step")
    loss = float("nan")
    for _ in range(steps):
        ids = rows[torch.randint(len(rows), (batch_size,), generator=gen)]
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
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    record = {"key": key, **settings, "public_rows": len(rows), "final_train_loss": loss}
    meta_path.write_text(json.dumps(record, indent=2))
    return record


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m parties.privatelora_base", description=__doc__.split("\n")[0])
    p.add_argument("scenario", help="scenario YAML whose model.path receives the base model")
    p.add_argument("--out", help="output folder (default: the scenario's model.path)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--records", type=int, default=600, help="public records to generate")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = p.parse_args(argv)
    sc = load_scenario(args.scenario)
    out = args.out or sc.model.path
    if not out:
        p.error(f"{args.scenario}: model.path is not set; pass --out")
    rec = build_base(sc, out, steps=args.steps, records=args.records, force=args.force, progress=True)
    print(f"{out}: base model pre-trained {rec['steps']} steps on public kinds {', '.join(rec['kinds'])}; "
          f"final train loss {rec['final_train_loss']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
