"""Per-party token data: records -> tokenizer -> partition -> packed train/eval rows.

``prepare_data(scenario, base_dir, cache_dir)`` returns a :class:`PreparedData` with the
tokenizer, every record, the planted canaries, and one :class:`PartyData` per party.
A party's records are shuffled, the last ``data.eval_fraction`` of them (at least one)
held out, and each side packed into rows of ``training.seq_len`` tokens (records end
in ``<eos>``).

Training rows are sampled in epochs without replacement (:class:`EpochSampler`): a
fresh permutation per epoch, consecutive batches take consecutive slices of it, so no
row repeats within an epoch and a model cannot win by seeing a few windows over and
over.
"""
import random
from dataclasses import dataclass, field

from typing import Optional

import torch

from . import canaries as canary_plan
from .generator import generate_records
from .loaders import load_records
from .partition import partition
from .tokenizer import encode_records, load_tokenizer, train_tokenizer

class EpochSampler:
    """Batches of rows drawn without replacement, one permutation per epoch.

    ``sampler(batch_size)`` returns the next ``batch_size`` rows of the current epoch's
    permutation (drawn with ``gen``, a torch.Generator); when fewer than ``batch_size``
    rows are left, the rest of the epoch is dropped and a new permutation starts, so a
    batch never holds a row twice and no row repeats within an epoch.  A set with fewer
    rows than one batch cannot avoid repeats: each batch is then the first
    ``batch_size`` entries of back-to-back permutations (every row at most
    ``ceil(batch_size / rows)`` times)."""

    def __init__(self, rows, gen):
        if len(rows) == 0:
            raise ValueError("EpochSampler: no rows to sample from")
        self.rows, self.gen = rows, gen
        self.order, self.pos, self.epoch = None, 0, -1

    def indices(self, batch_size):
        """The row indices of the next batch."""
        n = len(self.rows)
        if batch_size > n:
            self.epoch += 1
            reps = -(-batch_size // n)
            return torch.cat([torch.randperm(n, generator=self.gen) for _ in range(reps)])[:batch_size]
        if self.order is None or self.pos + batch_size > n:
            self.order, self.pos = torch.randperm(n, generator=self.gen), 0
            self.epoch += 1
        idx = self.order[self.pos:self.pos + batch_size]
        self.pos += batch_size
        return idx

    def __call__(self, batch_size):
        return self.rows[self.indices(batch_size)]


@dataclass
class PartyData:
    name: str
    train: torch.Tensor          # [rows, seq_len] int64
    eval: torch.Tensor           # [rows, seq_len] int64
    record_ids: list = field(default_factory=list)
    eval_record_ids: list = field(default_factory=list)
    original: Optional[torch.Tensor] = None   # training rows before a text defence (santext)
    planted_original: Optional[torch.Tensor] = None   # canary windows before a text defence
    planted: object = None       # canaries.CanaryRows: windows that open the first batches

    _samplers: dict = field(default_factory=dict, repr=False, compare=False)

    def sampler(self, gen):
        """The :class:`EpochSampler` of this party's training rows that draws with ``gen``
        (one per generator, so every protocol and role has its own epoch stream)."""
        key = id(gen)
        # the entry holds ``gen`` itself, so its id cannot be reused while the entry lives
        if key not in self._samplers or self._samplers[key].gen is not gen \
                or self._samplers[key].rows is not self.train:
            self._samplers[key] = EpochSampler(self.train, gen)
        return self._samplers[key]

    def sample(self, batch_size, gen):
        """The next ``batch_size`` training rows of the epoch stream drawn with ``gen``
        (a torch.Generator): without replacement within an epoch; planted canary windows
        open the first batches."""
        batch = self.sampler(gen)(batch_size)
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


def prepare_data(scenario, base_dir, cache_dir=None, tokenizer=None):
    """``tokenizer``: use this one (e.g. the pre-trained starting checkpoint's) instead of
    ``data.tokenizer``."""
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
    if tokenizer is not None:
        tok = tokenizer
    elif dc.tokenizer.path:
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
