"""Tests for the attack framework: adversary view, observers table, scorer, registry,
runner (incl. the testbed runner's ``attacks:`` hook) and the CLI.

One real run of scenarios/fedsgd-tiny.yaml (2 rounds, no baselines) serves every test.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from attacks import observers as obs
from attacks.base import Reconstruction
from attacks.cli import main as cli_main
from attacks.registry import attack_names, get_attack
from attacks.runner import format_table, parse_specs, run_attacks
from attacks.score import Scorer, token_accuracy
from attacks.view import AdversaryView, ThreatModelError
from parties.data.tokenizer import EOS_ID, load_tokenizer
from testbed.errors import ConfigError
from testbed.run.runner import run_scenario
from testbed.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
SPECS = ["bag-of-tokens", {"name": "dager", "observer": "coordinator", "options": {"max_batches": 1}}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """fedsgd-tiny, 2 rounds, with an ``attacks:`` list so the testbed runner's hook runs."""
    tmp = tmp_path_factory.mktemp("fedsgd")
    sc = load_scenario(ROOT / "scenarios" / "fedsgd-tiny.yaml", {
        "baselines": [], "training": {"steps": 2}, "compute": {"mode": "none"}, "attacks": SPECS})
    path, _ = run_scenario(sc, runs_root=tmp / "runs", base_dir=ROOT, cache_dir=tmp / "cache", progress=False)
    return path


def index(run):
    with open(run / "capture" / "index.jsonl") as f:
        return [json.loads(line) for line in f]


def truth(run):
    with open(run / "truth" / "tokens.jsonl") as f:
        return {(r["party"], r["step"]): r["input_ids"] for r in map(json.loads, f)}


# ---- adversary view ----------------------------------------------------------------------

@pytest.mark.parametrize("observer", ["coordinator", "party-0", "party-1", "wire"])
def test_view_holds_exactly_what_the_observer_saw(run, observer):
    lines = index(run)
    want = [r["seq"] for r in lines if observer == "wire" or observer in (r["src"], r["dst"])]
    view = AdversaryView(run, observer)
    assert [m.seq for m in view.messages()] == want
    assert set(view.roles) == {"coordinator", "party-0", "party-1"}


def test_view_filters_and_groups(run):
    view = AdversaryView(run, "coordinator")
    assert view.kinds() == {"round": 4, "grad": 4, "update": 4}
    grads = view.messages(kind="grad", step=1)
    assert sorted(m.src for m in grads) == ["party-0", "party-1"]
    assert [m.src for m in view.messages(kind="grad", party="party-0")] == ["party-0", "party-0"]
    assert view.messages(kind=("grad", "update"), src="party-1", step=0)[0].kind == "grad"
    groups = view.groups(kind="grad", by=("src", "step"))
    assert sorted((g.key["src"], g.key["step"]) for g in groups) == [
        ("party-0", 0), ("party-0", 1), ("party-1", 0), ("party-1", 1)]
    assert AdversaryView(run, "party-0").kinds() == {"round": 2, "grad": 2, "update": 2}


def test_view_tensors_load_lazily_and_exactly(run):
    view = AdversaryView(run, "coordinator")
    msg = view.messages(kind="grad")[0]
    spec = msg.specs["lm_head.weight"]
    stored = load_file(str(msg.file))[spec["key"]]
    t = msg.tensor("lm_head.weight")
    assert list(t.shape) == spec["shape"] == [512, 64]
    assert torch.equal(t, stored)
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        msg.tensor("nope")


def test_view_rejects_unknown_observer_and_knowledge(run):
    with pytest.raises(ValueError, match="valid: wire, coordinator, party-0, party-1"):
        AdversaryView(run, "server")
    with pytest.raises(ValueError, match="knowledge: unknown"):
        AdversaryView(run, "coordinator", knowledge={"truth"})


def test_view_grants_only_the_threat_models_knowledge(run):
    view = AdversaryView(run, "coordinator", knowledge={"config"})
    assert view.config()["training"]["batch_size"] == 2
    for ask in (view.init_model, view.tokenizer, lambda: view.aux_text(2)):
        with pytest.raises(ThreatModelError, match="not in this threat model"):
            ask()
    with pytest.raises(ThreatModelError):
        AdversaryView(run, "coordinator", knowledge=set()).config()


def test_view_has_no_path_to_truth(run):
    view = AdversaryView(run, "wire")
    with pytest.raises(ThreatModelError, match="truth/ is for scoring only"):
        view._public_path("truth/tokens.jsonl")
    cfg = view.config()
    assert "seed" not in cfg and set(cfg["data"]) == {"kinds"}


def test_attacks_run_the_same_without_truth(run, tmp_path):
    """The view never needs truth/: a copy of the run without it gives the same output."""
    blind = tmp_path / "blind"
    shutil.copytree(run, blind)
    shutil.rmtree(blind / "truth")
    for name, options in [("bag-of-tokens", {}), ("dager", {"max_batches": 1})]:
        attack = get_attack(name)
        got = [attack.run(AdversaryView(r, "coordinator", knowledge=attack.threat_model.knowledge),
                          **attack.resolve_options(options)) for r in (run, blind)]
        assert [r.to_json() for r in got[0]] == [r.to_json() for r in got[1]]
        assert got[0] and all(r.token_ids for r in got[0])


def test_aux_text_is_public_and_canary_free(run):
    view = AdversaryView(run, "coordinator")
    texts = view.aux_text(20)
    assert len(texts) == 20 and texts == view.aux_text(20)
    private = {json.loads(line)["text"] for line in open(run / "truth" / "records.jsonl")}
    canaries = json.loads((run / "truth" / "canaries.json").read_text())
    assert not set(texts) & private
    assert not [c for c in canaries for t in texts if c["value"] in t]


# ---- observers table ---------------------------------------------------------------------

def test_observer_table_defaults():
    roles = {"coordinator", "party-0", "party-2", "party-10"}
    assert obs.default_observers("fedsgd", ["grad"], roles) == ["coordinator"]
    assert obs.default_observers("fedsgd", ["update"], roles) == ["party-0", "party-2", "party-10"]
    assert obs.default_observers("pcmoe", ["expert_fwd"], roles) == ["party-0", "party-2", "party-10"]
    assert obs.default_observers("fedsgd", ["act"], roles) == []
    assert obs.default_observers("no-such-protocol", ["grad"], roles) == []
    assert obs.sees("split", "server", "act") and not obs.sees("split", "party-1", "act")
    assert obs.sees("split", "wire", "anything")


def test_observer_table_matches_fedsgd_capture(run):
    lines = index(run)
    for pattern, kinds in obs.declared("fedsgd").items():
        for kind in kinds:
            got = [r for r in lines if r["kind"] == kind and obs.fnmatch.fnmatchcase(r["dst"], pattern)]
            assert got, f"fedsgd: no {kind!r} message received by {pattern}"


# ---- scorer ------------------------------------------------------------------------------

@pytest.fixture
def scored_run(run, tmp_path):
    """A run directory with a hand-made truth: two rows, one holding a canary value."""
    tok = load_tokenizer(run / "public" / "tokenizer.json")
    texts = ["Private phone number: (617) 555-0142.",
             "Hi Mary, the budget for the product launch is ready; see you on Monday at noon"]
    rows = [tok.encode(t).ids for t in texts]
    n = min(len(r) for r in rows)
    rows = [r[:n] for r in rows]
    (tmp_path / "truth").mkdir()
    (tmp_path / "public").mkdir()
    shutil.copy(run / "public" / "tokenizer.json", tmp_path / "public")
    (tmp_path / "truth" / "tokens.jsonl").write_text(json.dumps(
        {"protocol": "p", "party": "party-0", "step": 0, "input_ids": rows}) + "\n")
    canary = {"id": "canary-0", "field": "phone", "value": "(617) 555", "prefix": "Private phone number:",
              "record_ids": [0]}
    (tmp_path / "truth" / "canaries.json").write_text(json.dumps([canary]))
    return tmp_path, rows


def test_scorer_exact_numbers(scored_run):
    path, rows = scored_run
    half = rows[1][: len(rows[1]) // 2] + [EOS_ID] * (len(rows[1]) - len(rows[1]) // 2)
    recs = [Reconstruction("p", "party-0", 0, rows[0]), Reconstruction("p", "party-0", 0, half)]
    summary, per = Scorer(path).score(recs)
    assert [e["matched_row"] for e in per] == [0, 1]   # row unknown: best match, each row once
    assert summary["rows"] == 2
    assert summary["token_accuracy"] == pytest.approx((1 + (len(rows[1]) // 2) / len(rows[1])) / 2)
    assert summary["exact_match"] == 0.5
    assert per[0]["rouge1"] == per[0]["rougeL"] == 1.0 and per[1]["rouge1"] < 1.0
    assert summary["canaries_present"] == 1 and summary["canary_recovery"] == 1.0


def test_scorer_counts_missing_rows_as_zero_and_uses_given_rows(scored_run):
    path, rows = scored_run
    summary, per = Scorer(path).score([Reconstruction("p", "party-0", 0, rows[0], row=1)])
    assert per[0]["matched_row"] == 1 and summary["rows"] == 2
    assert summary["token_accuracy"] == pytest.approx(token_accuracy(rows[0], rows[1]) / 2)
    assert summary["canary_recovery"] == 0.0
    summary, _ = Scorer(path).score([Reconstruction("p", "party-0", 0, [], secrets=["(617) 555-0142"])])
    assert summary["canary_recovery"] == 1.0 and summary["exact_match"] == 0.0


def test_scorer_set_metrics(scored_run):
    path, rows = scored_run
    truth_set = sorted({t for r in rows for t in r})
    pred = truth_set[:-2] + [t for t in range(3, 512) if t not in truth_set][:2]
    summary, _ = Scorer(path).score([Reconstruction("p", "party-0", 0, pred, kind="set")])
    assert summary["token_set_recall"] == pytest.approx((len(truth_set) - 2) / len(truth_set))
    assert summary["token_set_precision"] == pytest.approx((len(truth_set) - 2) / len(pred))
    assert summary["token_set_exact"] == 0.0 and "token_accuracy" not in summary
    summary, _ = Scorer(path).score([Reconstruction("p", "party-9", 0, pred, kind="set")])
    assert summary["unknown_batches"] == 1 and summary["batches"] == 0


def test_reconstruction_rejects_bad_kind():
    with pytest.raises(ValueError, match="expected one of sequence, set, routed"):
        Reconstruction("p", "party-0", 0, [1], kind="bag")


# ---- registry, options, specs ------------------------------------------------------------

def test_registry_lists_valid_names():
    assert {"bag-of-tokens", "dager", "tag"} <= set(attack_names())
    with pytest.raises(ValueError, match="unknown attack 'nope'; valid: bag-of-tokens, dager, tag"):
        get_attack("nope")


def test_options_are_checked():
    dager = get_attack("dager")
    assert dager.resolve_options({"beam": 8.0})["beam"] == 8
    with pytest.raises(ConfigError) as exc:
        dager.resolve_options({"bem": 8, "span_tol": "small"})
    assert any(p.startswith("bem: unknown option; valid: aggregate, beam,") for p in exc.value.problems)
    assert "span_tol: expected float (got 'small')" in exc.value.problems


def test_tag_rejects_an_unknown_embedding_mode(run):
    with pytest.raises(ConfigError, match="embeddings: expected 'mixture' or 'free' \\(got 'soft'\\)"):
        get_attack("tag").run(AdversaryView(run, "coordinator"), embeddings="soft")


def test_specs_are_checked_together():
    with pytest.raises(ConfigError) as exc:
        parse_specs(["nope", {"name": "dager", "where": 1}, {"name": "tag", "options": {"iters": "x"}}, 3])
    problems = exc.value.problems
    assert problems[0].startswith("0.name: unknown attack 'nope'")
    assert problems[1] == "1.where: unknown key; valid: name, observer, options"
    assert problems[2] == "2.options.iters: expected int (got 'x')"
    assert problems[3].startswith("3: expected an attack name")


# ---- runner and CLI ----------------------------------------------------------------------

def test_testbed_runner_ran_the_scenarios_attacks(run):
    bag = json.loads((run / "attacks" / "bag-of-tokens-coordinator.json").read_text())
    dager = json.loads((run / "attacks" / "dager-coordinator.json").read_text())
    assert bag["status"] == dager["status"] == "ok"
    assert len(bag["reconstructions"]) == 4 and bag["scores"]["token_set_precision"] == 1.0
    assert dager["options"]["max_batches"] == 1 and dager["scores"]["batches"] == 1
    assert dager["threat_model"]["observers"] == ["coordinator", "wire"]


def test_cli_table_and_json_agree(run, capsys):
    assert cli_main(["run", str(run), "--attack", "bag-of-tokens", "--observer", "wire"]) == 0
    out = capsys.readouterr().out
    saved = json.loads((run / "attacks" / "bag-of-tokens-wire.json").read_text())
    row = next(line.split() for line in out.splitlines() if line.startswith("bag-of-tokens"))
    assert row[1] == "wire"
    assert row[-3] == f"{saved['scores']['token_set_recall']:.3f}"
    assert row[-2] == f"{saved['scores']['token_set_precision']:.3f}"
    assert f"wrote {run / 'attacks' / 'bag-of-tokens-wire.json'}" in out
    assert format_table([saved]).splitlines()[1].split()[:-1] == row[:-1]


def test_cli_errors_are_one_line(run, capsys):
    assert cli_main(["run", str(run), "--attack", "nope"]) == 2
    assert "unknown attack 'nope'" in capsys.readouterr().err
    assert cli_main(["run", str(run), "--attack", "dager", "--observer", "party-0"]) == 2
    assert "outside its threat model" in capsys.readouterr().err


def test_runner_skips_attacks_for_other_protocols(run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    sc = yaml.safe_load((other / "scenario.yaml").read_text())
    sc["protocol"]["name"] = "split"
    (other / "scenario.yaml").write_text(yaml.safe_dump(sc))
    [res] = run_attacks(other, ["dager"])
    assert res["status"] == "skipped" and "does not target split" in res["note"]
    assert json.loads((other / "attacks" / "dager.json").read_text())["status"] == "skipped"
    assert "skipped: dager does not target split" in format_table([res])
