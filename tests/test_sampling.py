"""Epoch sampling without replacement and a generator that scales without repeated windows.

Every protocol samples a party's training rows through ``PartyData.sample`` (an
:class:`parties.data.dataset.EpochSampler` per generator) or ``parties.base.pooled_sampler``;
these tests check the rows each batch holds, epoch by epoch, on real prepared data.
"""
import random
from pathlib import Path

import pytest
import torch

from parties.base import RoleContext, pooled_sampler
from parties.data import generate_records
from parties.data.dataset import EpochSampler, pack, prepare_data
from parties.data.tokenizer import encode_records, train_tokenizer
from testbed.scenario import CanaryCfg, parse_scenario

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "tokenizers"


def _rows_seen(batches):
    return [tuple(r.tolist()) for b in batches for r in b]


def test_no_batch_repeats_a_row_within_an_epoch():
    rows = torch.arange(50).unsqueeze(1).repeat(1, 4)       # row i is [i, i, i, i]
    s = EpochSampler(rows, torch.Generator().manual_seed(3))
    per_epoch = 50 // 8
    for epoch in range(4):
        ids = torch.cat([s.indices(8) for _ in range(per_epoch)])
        assert s.epoch == epoch
        assert len(set(ids.tolist())) == len(ids) == per_epoch * 8   # no row twice in the epoch
    # the dropped tail differs between epochs, so every row is eventually seen
    seen = {i for _ in range(20) for i in s.indices(8).tolist()}
    assert seen == set(range(50))


def test_sampler_is_deterministic_per_generator_and_small_sets_repeat_evenly():
    rows = torch.arange(30).unsqueeze(1)
    a_s, b_s = (EpochSampler(rows, torch.Generator().manual_seed(1)) for _ in range(2))
    assert all(torch.equal(a_s(4), b_s(4)) for _ in range(12))
    other = EpochSampler(rows, torch.Generator().manual_seed(2))
    assert not torch.equal(other(4), EpochSampler(rows, torch.Generator().manual_seed(1))(4))
    tiny = EpochSampler(torch.arange(3).unsqueeze(1), torch.Generator().manual_seed(0))
    batch = tiny(7).flatten().tolist()
    assert sorted(set(batch)) == [0, 1, 2] and max(batch.count(i) for i in range(3)) == 3
    with pytest.raises(ValueError, match="no rows"):
        EpochSampler(torch.zeros(0, 4), torch.Generator())


def test_protocol_sampling_on_prepared_data_never_repeats_a_row_within_an_epoch():
    sc = parse_scenario({"name": "s", "data": {"records": 400, "canaries": {"placement": "records"}},
                         "parties": {"count": 2}, "training": {"batch_size": 8, "seq_len": 32}})
    data = prepare_data(sc, REPO, CACHE)
    ctx = RoleContext(scenario=sc, vocab_size=data.vocab_size, parties=data.parties,
                      device=torch.device("cpu"), build_model=None)
    # a party's stream (local, pcmoe, fedavg, fedsgd, split, privatelora)
    pd = data.parties[0]
    gen = ctx.generator("party-0")
    per_epoch = len(pd.train) // 8
    for _ in range(2):
        seen = _rows_seen([pd.sample(8, gen) for _ in range(per_epoch)])
        assert len(seen) == len(set(seen)) == per_epoch * 8
    # the pooled stream (centralized, pooled LoRA)
    sample = pooled_sampler(ctx, ctx.generator("site"))
    pool = sum(len(p.train) for p in data.parties)
    seen = _rows_seen([sample() for _ in range(pool // 8)])
    assert len(seen) == len(set(seen)) == (pool // 8) * 8


def test_generator_scales_to_thousands_of_records_without_repeated_windows():
    n = 6000
    records, _ = generate_records(["patient_note", "support_ticket", "email", "bank_statement"], n,
                                  random.Random(0), CanaryCfg(count=8))
    tok = train_tokenizer([r["text"] for r in records], 1024, CACHE)
    rows = pack(encode_records(tok, records), 64)
    windows = {tuple(r.tolist()) for r in rows}
    assert len(rows) > 4 * 1000                         # thousands of windows per party of 4
    assert len(windows) == len(rows)                    # not one 64-token window twice
