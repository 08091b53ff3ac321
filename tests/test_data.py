"""Tests for parties.data: generator, loaders, tokenizer and partitioning."""
import json
import random
import time
from collections import Counter

import pytest

from parties.data import (EOS_ID, KINDS, PAD_ID, UNK_ID, decode_ids, encode_records, generate_records,
                          load_records, load_tokenizer, partition, train_tokenizer)
from parties.data import tokenizer as tokmod
from testbed.scenario import CanaryCfg, DataCfg, SplitCfg

THREE = ["patient_note", "support_ticket", "email"]


@pytest.fixture(scope="module")
def generated():
    return generate_records(THREE, 400, random.Random(0), CanaryCfg(count=8, repeats=1))


# ---- generator -----------------------------------------------------------------------

def test_generator_is_deterministic_and_seed_dependent():
    a = generate_records(list(KINDS), 60, random.Random(7), CanaryCfg(count=4, repeats=2))
    b = generate_records(list(KINDS), 60, random.Random(7), CanaryCfg(count=4, repeats=2))
    c = generate_records(list(KINDS), 60, random.Random(8), CanaryCfg(count=4, repeats=2))
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]


def test_records_shape_balance_and_length(generated):
    records, _ = generated
    assert [r["id"] for r in records] == list(range(400))
    counts = Counter(r["kind"] for r in records)
    assert set(counts) == set(THREE) and max(counts.values()) - min(counts.values()) <= 1
    for r in records:
        assert set(r) == {"id", "kind", "text"}
        assert 40 <= len(r["text"].split()) <= 120, r
    assert len({r["text"] for r in records}) == len(records)


@pytest.mark.parametrize("count,repeats", [(8, 1), (5, 3), (30, 4)])
def test_canaries_planted_verbatim(count, repeats):
    records, canaries = generate_records(THREE, 100, random.Random(1), CanaryCfg(count=count, repeats=repeats))
    assert len(canaries) == count
    assert len({c["value"] for c in canaries}) == count
    for c in canaries:
        assert len(set(c["record_ids"])) == repeats
        holders = {r["id"] for r in records if c["value"] in r["text"]}
        assert holders == set(c["record_ids"]), c
        for rid in c["record_ids"]:
            assert f"{c['prefix']} {c['value']}" in records[rid]["text"]
    if count * repeats <= 100:
        all_ids = [i for c in canaries for i in c["record_ids"]]
        assert len(all_ids) == len(set(all_ids))
    assert {c["field"] for c in canaries} >= ({"name", "account_number", "phone", "diagnosis", "ssn"}
                                              if count >= 5 else set())


def test_no_canaries_and_too_many_repeats():
    _, canaries = generate_records(THREE, 10, random.Random(0), CanaryCfg(count=0))
    assert canaries == []
    with pytest.raises(ValueError, match="repeats"):
        generate_records(THREE, 3, random.Random(0), CanaryCfg(count=1, repeats=4))


def test_unknown_kind_names_it_and_lists_valid():
    with pytest.raises(ValueError, match="tax_return") as err:
        generate_records(["email", "tax_return"], 10, random.Random(0), CanaryCfg())
    assert "patient_note" in str(err.value) and "hr_review" in str(err.value)


# ---- loaders -------------------------------------------------------------------------

def test_load_text_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  second line \n")
    records = load_records(DataCfg(source="text", path="a.txt"), tmp_path)
    assert records == [{"id": 0, "kind": "text", "text": "first line"},
                       {"id": 1, "kind": "text", "text": "second line"}]
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "2.txt").write_text("doc two\nstill two")
    (folder / "1.txt").write_text("doc one")
    records = load_records(DataCfg(source="text", path="docs"), tmp_path)
    assert [r["text"] for r in records] == ["doc one", "doc two\nstill two"]
    assert [r["id"] for r in records] == [0, 1]


def test_load_jsonl_and_errors(tmp_path):
    rows = [{"body": "hello there", "kind": "email"}, {"body": "plain note"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    records = load_records(DataCfg(source="jsonl", path="d.jsonl", text_field="body"), tmp_path)
    assert [(r["id"], r["kind"], r["text"]) for r in records] == [(0, "email", "hello there"),
                                                                   (1, "text", "plain note")]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_records(DataCfg(source="jsonl", path="bad.jsonl"), tmp_path)
    (tmp_path / "nokey.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"nokey\.jsonl:2.*'text'"):
        load_records(DataCfg(source="jsonl", path="nokey.jsonl"), tmp_path)
    with pytest.raises(ValueError, match=r"missing\.jsonl"):
        load_records(DataCfg(source="jsonl", path="missing.jsonl"), tmp_path)


def test_load_with_datasets_json(tmp_path):
    rows = [{"text": f"record number {i}", "kind": "k" + str(i % 2)} for i in range(5)]
    (tmp_path / "d.json").write_text("\n".join(json.dumps(r) for r in rows))
    records = load_records(DataCfg(source="datasets", path="d.json"), tmp_path)
    assert [r["text"] for r in records] == [r["text"] for r in rows]
    assert [r["kind"] for r in records] == [r["kind"] for r in rows]
    with pytest.raises(ValueError, match=r"d\.json: row 1.*'body'"):
        load_records(DataCfg(source="datasets", path="d.json", text_field="body"), tmp_path)


# ---- tokenizer -----------------------------------------------------------------------

def test_tokenizer_round_trip_and_special_ids(generated):
    records, _ = generated
    start = time.perf_counter()
    tok = train_tokenizer([r["text"] for r in records], 512, None)
    assert time.perf_counter() - start < 3
    assert tok.get_vocab_size() <= 512
    assert (tok.token_to_id("<pad>"), tok.token_to_id("<eos>"), tok.token_to_id("<unk>")) == (0, 1, 2)
    assert (PAD_ID, EOS_ID, UNK_ID) == (0, 1, 2)
    ids = encode_records(tok, records)
    assert all(seq[-1] == EOS_ID and EOS_ID not in seq[:-1] for seq in ids)
    assert all(decode_ids(tok, seq) == r["text"] for seq, r in zip(ids, records))
    # Byte-level: text never seen in training still round-trips.
    odd = {"text": "Zoë paid €12 — 日本 ✓"}
    assert decode_ids(tok, encode_records(tok, [odd])[0]) == odd["text"]


@pytest.mark.parametrize("vocab", [64, 300])
def test_tokenizer_vocab_never_exceeds_request(generated, vocab):
    tok = train_tokenizer([r["text"] for r in generated[0][:50]], vocab, None)
    assert tok.get_vocab_size() <= vocab


def test_tokenizer_cache_hit_skips_training(generated, tmp_path, monkeypatch):
    texts = [r["text"] for r in generated[0][:100]]
    first = train_tokenizer(texts, 300, tmp_path)
    files = list(tmp_path.glob("*/tokenizer.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns

    def no_training(*_):
        raise AssertionError("retrained despite a cached tokenizer")

    monkeypatch.setattr(tokmod, "_train", no_training)
    second = train_tokenizer(texts, 300, tmp_path)
    assert second.get_vocab() == first.get_vocab()
    assert files[0].stat().st_mtime_ns == mtime
    assert load_tokenizer(files[0]).get_vocab() == first.get_vocab()
    # A different vocabulary size (or corpus) is a different cache entry.
    monkeypatch.undo()
    train_tokenizer(texts, 320, tmp_path)
    assert len(list(tmp_path.glob("*/tokenizer.json"))) == 2


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(ValueError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")


# ---- partition -----------------------------------------------------------------------

LABELLED = [{"id": i, "kind": f"k{i % 10}"} for i in range(1000)]


def _tv_from_global(records, shards):
    """Mean total-variation distance of each shard's label distribution from the global one."""
    glob = Counter(r["kind"] for r in records)
    out = []
    for s in shards:
        c = Counter(records[i]["kind"] for i in s)
        out.append(0.5 * sum(abs(c[k] / len(s) - glob[k] / len(records)) for k in glob))
    return sum(out) / len(out)


def _check_cover(shards, n_records, n_parties):
    assert len(shards) == n_parties and all(shards)
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n_records))


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity", "by_source"])
@pytest.mark.parametrize("alpha", [0.05, 1.0, 100.0])
def test_partition_covers_every_record_once(method, alpha):
    for seed in range(3):
        shards = partition(LABELLED, 5, SplitCfg(method=method, alpha=alpha), random.Random(seed))
        _check_cover(shards, len(LABELLED), 5)
        assert shards == partition(LABELLED, 5, SplitCfg(method=method, alpha=alpha), random.Random(seed))


def test_iid_balanced_sizes_and_labels():
    shards = partition(LABELLED[:997], 4, SplitCfg(method="iid"), random.Random(0))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert _tv_from_global(LABELLED[:997], shards) < 0.15


def test_by_source_gives_whole_labels():
    shards = partition(LABELLED, 3, SplitCfg(method="by_source"), random.Random(0))
    owners = {}
    for p, s in enumerate(shards):
        for i in s:
            owners.setdefault(LABELLED[i]["kind"], set()).add(p)
    assert len(owners) == 10 and all(len(v) == 1 for v in owners.values())
    with pytest.raises(ValueError, match="by_source"):
        partition(LABELLED, 11, SplitCfg(method="by_source"), random.Random(0))


def test_dirichlet_small_alpha_is_more_skewed():
    skew = {a: sum(_tv_from_global(LABELLED, partition(LABELLED, 5, SplitCfg(method="dirichlet", alpha=a),
                                                       random.Random(s))) for s in range(3)) / 3
            for a in (0.1, 100.0)}
    assert skew[100.0] < 0.1
    assert skew[0.1] > 0.4
    assert skew[0.1] > 4 * skew[100.0]


def test_dirichlet_every_party_nonempty_with_few_records():
    few = LABELLED[:12]
    for seed in range(20):
        _check_cover(partition(few, 6, SplitCfg(method="dirichlet", alpha=0.01), random.Random(seed)), 12, 6)


def test_quantity_skew_follows_alpha():
    def ratio(alpha, seed):
        sizes = [len(s) for s in partition(LABELLED, 5, SplitCfg(method="quantity", alpha=alpha),
                                           random.Random(seed))]
        return max(sizes) / min(sizes)
    assert min(ratio(0.1, s) for s in range(3)) > 10
    assert max(ratio(100.0, s) for s in range(3)) < 1.5


def test_partition_errors():
    with pytest.raises(ValueError, match="3 records"):
        partition(LABELLED[:3], 4, SplitCfg(), random.Random(0))
    with pytest.raises(ValueError, match="'source'"):
        partition(LABELLED, 2, SplitCfg(method="dirichlet", label="source"), random.Random(0))
    cfg = SplitCfg()
    object.__setattr__(cfg, "method", "random")  # bypass validation to reach the runtime check
    with pytest.raises(ValueError, match="random.*iid"):
        partition(LABELLED, 2, cfg, random.Random(0))


# ---- canaries in the traffic ---------------------------------------------------------

@pytest.mark.parametrize("placement", ["traffic", "records"])
def test_canary_windows_open_each_holders_first_batches(tmp_path, placement):
    """Each trained canary's window (its value whole) opens its holder's first batch, for
    every sampling generator afresh; ``records`` plants nothing in batches."""
    import torch

    from parties.data.dataset import prepare_data
    from testbed.rundir import canary_hits
    from testbed.scenario import parse_scenario
    sc = parse_scenario({"name": "c", "seed": 1, "data": {"records": 40, "canaries": {"count": 4, "placement": placement},
                                                          "tokenizer": {"vocab_size": 300}},
                         "parties": {"count": 2}, "training": {"batch_size": 3, "seq_len": 24}}, "<t>")
    data = prepare_data(sc, tmp_path, None)
    trained = {c["id"] for c in data.canaries for p in data.parties if set(c["record_ids"]) & set(p.record_ids)}
    assert trained and all(c["token_ids"] for c in data.canaries)
    planted = {c["id"] for c in data.canaries if c["planted"]}
    assert planted == (trained if placement == "traffic" else set())
    for p in data.parties:
        mine = [(c, x) for c in data.canaries for x in c["planted"] if x["party"] == p.name]
        for _ in range(2):   # two protocols of one run: each generator starts at batch 0
            gen = torch.Generator().manual_seed(0)
            batches = [p.sample(3, gen).tolist() for _ in range(2)]
            for c, x in mine:
                row = batches[x["batch"]][x["row"]]
                assert len(row) == 24 and c["value"] in decode_ids(data.tokenizer, row)
                assert {h["canary"] for h in canary_hits([row], data.canaries)} >= {c["id"]}
