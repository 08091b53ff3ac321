"""Per-party token data: records -> tokenizer -> partition -> packed train/eval rows.

``prepare_data(scenario, base_dir, cache_dir)`` returns a :class:`PreparedData` with the
tokenizer, every record, the planted canaries, and one :class:`PartyData` per party.
A party's records are shuffled, the last ``data.eval_fraction`` of them (at least one)
held out, and each side packed into rows of ``training.seq_len`` tokens (records end
in ``<eos>``).
"""
import random
from dataclasses import dataclass, field

import torch

from . import canaries as canary_plan
from .generator import generate_records
from .loaders import load_records
from .partition import partition
from .tokenizer import encode_records, load_tokenizer, train_tokenizer

@dataclass
class PartyData:
    name: str
    train: torch.Tensor          # [rows, seq_len] int64
    eval: torch.Tensor           # [rows, seq_len] int64
    record_ids: list = field(default_factory=list)
    eval_record_ids: list = field(default_factory=list)
    planted: object = None       # canaries.CanaryRows: windows that open the first batches

    def sample(self, batch_size, gen):
        """``batch_size`` training rows drawn with ``gen`` (a torch.Generator)."""
        idx = torch.randint(len(self.train), (batch_size,), generator=gen)
        batch = self.train[idx]
        return batch if self.planted is None else self.planted.apply(batch, gen)

    def eval_batches(self, batch_size, n_batches):
        """The first ``n_batches`` held-out batches, in a fixed order."""
        rows = self.eval[: batch_size * n_batches]
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


@dataclass
class PreparedData:
    tokenizer: object
    records: list
    canaries: list
    shards: list                 # per party: record indices
    parties: list                # PartyData

    @property
    def vocab_size(self):
        return self.tokenizer.get_vocab_size()


def pack(token_lists, seq_len, min_rows=1):
    """Concatenate records (each already ends in <eos>) and cut into [rows, seq_len]."""
    stream = [t for ids in token_lists for t in ids]
    if not stream:
        raise ValueError("no tokens to pack: the shard is empty")
    while len(stream) < seq_len * min_rows:  # a tiny shard is repeated rather than padded
        stream = stream + stream
    rows = len(stream) // seq_len
    return torch.tensor(stream[: rows * seq_len], dtype=torch.int64).view(rows, seq_len)


def prepare_data(scenario, base_dir, cache_dir=None):
    dc, n = scenario.data, scenario.parties.count
    rng = random.Random(scenario.seed)
    if dc.source == "generate":
        records, canaries = generate_records(dc.kinds, dc.records, rng, dc.canaries)
    else:
        records, canaries = load_records(dc, base_dir), []
    if len(records) < 2 * n:
        raise ValueError(f"data: {len(records)} records are too few for {n} parties "
                         "(need at least 2 per party: one to train, one to hold out)")
    texts = [r["text"] for r in records]
    if dc.tokenizer.path:
        if not (base_dir / dc.tokenizer.path).exists():
            from testbed.errors import ConfigError
            raise ConfigError("data.tokenizer.path", [
                f"{dc.tokenizer.path} does not exist (a tokenizer.json "
                "saved by the tokenizers library is expected)"])
        tok = load_tokenizer(base_dir / dc.tokenizer.path)
    else:
        tok = train_tokenizer(texts, dc.tokenizer.vocab_size, cache_dir)
    encoded = encode_records(tok, records)
    shards = partition(records, n, dc.split, rng)
    parties = []
    seq = scenario.training.seq_len
    for i, shard in enumerate(shards):
        order = list(shard)
        rng.shuffle(order)
        n_eval = max(1, round(len(order) * dc.eval_fraction))
        train_ids, eval_ids = order[:-n_eval] or order[:1], order[-n_eval:]
        parties.append(PartyData(
            name=f"party-{i}",
            train=pack([encoded[j] for j in train_ids], seq),
            eval=pack([encoded[j] for j in eval_ids], seq,
                      min_rows=scenario.training.batch_size * scenario.training.eval_batches),
            record_ids=[records[j]["id"] for j in train_ids],
            eval_record_ids=[records[j]["id"] for j in eval_ids]))
    canary_plan.plan(canaries, records, parties, tok, seq, scenario.training.batch_size,
                     dc.canaries.placement)
    return PreparedData(tok, records, canaries, shards, parties)
