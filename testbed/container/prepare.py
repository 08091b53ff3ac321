"""One-shot data preparation for a container run: split the data into per-party shards.

    SCENARIO=scenarios/pcmoe-tiny.yaml DATA_DIR=/tmp/data python -m testbed.container prepare

Does what the embedded runner does before training -- records, tokenizer, partition,
packed rows (:func:`parties.data.dataset.prepare_data`), the shared starting checkpoint
(:func:`parties.models.build_model` with the scenario seed) -- and writes it in the
layout of :mod:`testbed.container.shards`, one directory per party, so that each party
container can be given its own shard and nothing more.
"""
import json
import logging
import shutil
from pathlib import Path

from parties.base import party_name
from parties.data.dataset import prepare_data
from parties.defences import santext
from parties.models import build_model
from parties.pretrain import starting_point

from .shards import PREPARED, party_dir, write_shard

log = logging.getLogger(__name__)


def prepare(scenario, data_dir, base_dir="."):
    """Write the prepared data of ``scenario`` under ``data_dir``; returns its summary dict."""
    from transformers.utils import logging as hf_logging

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / PREPARED).unlink(missing_ok=True)
    # a reused volume: no stale shards.  Directories are emptied, not removed: a party's
    # container may have its directory bind-mounted already.
    for old in ["public", "truth", *(p.name for p in data_dir.glob("party-*"))]:
        for item in (data_dir / old).glob("*"):
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    tokenizer, model_cfg, _ = starting_point(scenario, base_dir)   # init.pretrain, if any
    data = prepare_data(scenario, Path(base_dir), None, tokenizer)
    public = data_dir / "public"
    public.mkdir(exist_ok=True)
    data.tokenizer.save(str(public / "tokenizer.json"))
    hf_logging.disable_progress_bar()
    init_model = build_model(model_cfg, data.vocab_size, scenario.seed)
    init_model.save_pretrained(public / "init-model")
    santext.apply(scenario, data, init_model)
    truth = data_dir / "truth"
    truth.mkdir(exist_ok=True)
    (truth / "canaries.json").write_text(json.dumps(data.canaries, indent=2))
    (truth / "partition.json").write_text(json.dumps({
        party_name(i): {"train": p.record_ids, "eval": p.eval_record_ids}
        for i, p in enumerate(data.parties)}, indent=2))
    with open(truth / "records.jsonl", "w") as f:
        for r in data.records:
            f.write(json.dumps(r) + "\n")
    info = {"scenario": scenario.name, "digest": scenario.digest(), "parties": len(data.parties),
            "vocab_size": data.vocab_size}
    for i, pd in enumerate(data.parties):
        d = party_dir(data_dir, i)
        write_shard(d, pd)
        shutil.copytree(public, d / "public")
        (d / PREPARED).write_text(json.dumps(info, indent=2))
    # written last: its presence means the rest is complete
    (data_dir / PREPARED).write_text(json.dumps(info, indent=2))
    log.info("prepared %d shards for %s in %s", len(data.parties), scenario.name, data_dir)
    return info
