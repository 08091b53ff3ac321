"""The prepared-data layout of a container run, and what each process loads from it.

::

    DATA_DIR/
      prepared.json      scenario name and digest, party count, vocabulary size
      public/            tokenizer.json, init-model/ (the shared starting checkpoint)
      truth/             canaries.json, partition.json, records.jsonl (scoring only)
      party-<i>/         shard.safetensors (train, eval rows), shard.json (record ids),
                         public/ (a copy of the public artefacts)

A party container mounts only ``party-<i>/`` (``python -m testbed up``), so it can
load its own rows and the public checkpoint, and nothing else.  Every other party's
entry in ``ctx.parties`` is an :class:`Unavailable` stand-in that raises when a role
touches it.  The coordinator mounts the whole directory (it assembles ``truth/`` into
the run directory); its roles see the stand-ins too -- except in protocols with no
party roles at all (``centralized``, ``lora``), whose single site is, by definition,
where every party's data was handed over.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from parties.data.dataset import PartyData
from testbed.errors import ConfigError, ProtocolError

SHARD, SHARD_META, PREPARED = "shard.safetensors", "shard.json", "prepared.json"


def party_dir(data_dir, index):
    return Path(data_dir) / f"party-{index}"


def write_shard(directory, pd):
    """Save one party's PartyData (rows as safetensors, record ids as JSON)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = {"train": pd.train.contiguous(), "eval": pd.eval.contiguous()}
    if pd.original is not None:  # the party's own text before a text defence (its truth)
        rows["original"] = pd.original.contiguous()
    if pd.planted is not None:   # canary windows that open the party's first batches
        rows["planted"] = pd.planted.rows.contiguous()
    if pd.planted_original is not None:
        rows["planted_original"] = pd.planted_original.contiguous()
    save_file(rows, str(directory / SHARD))
    (directory / SHARD_META).write_text(json.dumps(
        {"name": pd.name, "record_ids": pd.record_ids, "eval_record_ids": pd.eval_record_ids,
         "planted_batch_size": pd.planted.batch_size if pd.planted is not None else None}))


def read_shard(directory):
    directory = Path(directory)
    if not (directory / SHARD).is_file():
        raise ConfigError(str(directory), [f"no {SHARD}: run `python -m testbed.container prepare` first "
                                           "(or the shard is not mounted here)"])
    rows = load_file(str(directory / SHARD))
    meta = json.loads((directory / SHARD_META).read_text())
    planted = None
    if "planted" in rows:
        from parties.data.canaries import CanaryRows
        planted = CanaryRows(rows["planted"], meta["planted_batch_size"])
    return PartyData(name=meta["name"], train=rows["train"], eval=rows["eval"], original=rows.get("original"),
                     planted=planted, planted_original=rows.get("planted_original"), record_ids=meta["record_ids"], eval_record_ids=meta["eval_record_ids"])


class Unavailable:
    """Stands in for another party's data: any use names whose data it is and where."""

    def __init__(self, party, holder):
        self._party, self._holder = party, holder

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise ProtocolError(f"{self._holder}: tried to read {self._party}'s data ({attr}); only "
                            "the party's own shard is mounted in its container")


@dataclass
class DataView:
    """What ``runner.build_roles`` needs of the data: vocabulary size and per-party rows."""

    vocab_size: int
    parties: list


def read_prepared(data_dir, scenario):
    """``prepared.json``, checked against the scenario this process runs."""
    path = Path(data_dir) / PREPARED
    if not path.is_file():
        raise ConfigError(str(path), ["missing: run `python -m testbed.container prepare` first"])
    info = json.loads(path.read_text())
    if info.get("digest") != scenario.digest():
        raise ConfigError(str(path), [f"prepared for scenario {info.get('scenario')!r} (digest "
                                      f"{info.get('digest')}), not for {scenario.name!r} (digest "
                                      f"{scenario.digest()}): run prepare again"])
    return info


def party_view(data_dir, scenario, index, holder):
    """Party ``index``'s view: its own shard, stand-ins for the others."""
    own = party_dir(data_dir, index)
    info = read_prepared(own, scenario)
    parties = [read_shard(own) if i == index else Unavailable(f"party-{i}", holder)
               for i in range(info["parties"])]
    return DataView(info["vocab_size"], parties), own / "public"


def coordinator_view(data_dir, scenario, pooled):
    """The coordinator's view: every shard when ``pooled`` (single-site protocols), else
    stand-ins."""
    info = read_prepared(data_dir, scenario)
    n = info["parties"]
    parties = [read_shard(party_dir(data_dir, i)) if pooled else Unavailable(f"party-{i}", "coordinator")
               for i in range(n)]
    return DataView(info["vocab_size"], parties), Path(data_dir) / "public"


def load_init_model(public_dir, scenario):
    """The shared starting checkpoint, as saved by prepare (exactly the embedded engine's)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from parties.models import DTYPES
    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(Path(public_dir) / "init-model",
                                                dtype=DTYPES[scenario.model.dtype])
