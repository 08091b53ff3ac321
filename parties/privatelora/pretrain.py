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
import json
import logging
from pathlib import Path

from testbed.scenario import load_scenario

from parties.pretrain import pretrain, public_kinds, settings_key

log = logging.getLogger(__name__)


def build_base(scenario, out_dir, steps=300, records=600, batch_size=16, lr=3e-3, force=False,
               progress=False):
    """Pre-train ``scenario.model`` (family llama) on public text into ``out_dir``
    (:func:`parties.pretrain.pretrain`).  Returns the ``base.json`` record (kinds, steps,
    final training loss, ...)."""
    out = Path(out_dir)
    settings = {"model": scenario.model.model_dump(exclude={"path"}), "kinds": public_kinds(scenario),
                "records": records, "steps": steps, "batch_size": batch_size, "lr": lr,
                "seq_len": scenario.training.seq_len, "seed": scenario.seed,
                "vocab_size": scenario.data.tokenizer.vocab_size}
    key = settings_key(settings)
    meta_path = out / "base.json"
    if not force and meta_path.exists() and json.loads(meta_path.read_text()).get("key") == key:
        log.info("%s: base model up to date", out)
        return json.loads(meta_path.read_text())
    if scenario.model.family != "llama":
        raise ValueError(f"model.family: the PrivateLoRA base must be llama (got {scenario.model.family!r})")
    return pretrain(scenario.model, settings, out, progress=progress)


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
