"""The privacy regression gate (testbed/regress.py): direction-aware pass/fail logic,
``--update`` arithmetic, baseline validation, and the committed gate catching a weakened
defence (real runs and attacks)."""
import pytest
import yaml

from testbed.errors import ConfigError
from testbed.regress import (DEFAULT_BASELINE, evaluate, format_table, load_baseline, main,
                             run_regress, updated_checks, write_baseline)

from conftest import ROOT

MIN = {"scenario": "base", "attack": "dager", "metric": "token_accuracy", "min": 0.95}
MAX = {"scenario": "defended", "attack": "dager", "observer": "coordinator", "metric": "token_accuracy",
       "max": 0.05}


def _res(attack="dager", observer="coordinator", status="ok", **scores):
    return {"attack": attack, "observer": observer, "status": status, "scores": scores}


def test_min_and_max_checks_pass_at_their_bound_and_fail_past_it():
    scores = {"base": [_res(token_accuracy=0.95)], "defended": [_res(token_accuracy=0.05)]}
    assert [r.passed for r in evaluate([MIN, MAX], scores)] == [True, True]
    scores = {"base": [_res(token_accuracy=0.9499)], "defended": [_res(token_accuracy=0.0501)]}
    a, b = evaluate([MIN, MAX], scores)
    assert not a.passed and a.reason == "below the minimum 0.95" and a.value == 0.9499
    assert not b.passed and b.reason == "above the maximum 0.05"


def test_largest_score_counts_and_observer_filters():
    scores = {"base": [_res(observer="party-0", token_accuracy=0.2), _res(observer="wire", token_accuracy=1.0)],
              "defended": [_res(observer="wire", token_accuracy=0.9), _res(token_accuracy=0.01)]}
    a, b = evaluate([MIN, MAX], scores)
    assert a.passed and a.value == 1.0          # no observer given: the best attack counts
    assert b.passed and b.value == 0.01         # observer given: only the coordinator's score


def test_a_missing_score_fails_with_the_reason():
    checks = [MIN, MAX, dict(MIN, metric="rouge1")]
    scores = {"base": [_res(status="skipped", token_accuracy=1.0) | {"note": "dager does not target split"}]}
    a, b, c = evaluate(checks, scores)
    assert not a.passed and a.value is None and "does not target split" in a.reason
    assert not b.passed and b.reason == "scenario not run"
    scores = {"base": [_res(token_accuracy=1.0)], "defended": "scenario failed: exit 3: boom"}
    a, b, c = evaluate(checks, scores)
    assert a.passed and b.reason == "scenario failed: exit 3: boom"
    assert not c.passed and c.reason == "no rouge1 score from dager"
    table = format_table([a, b, c])
    assert "base/dager/token_accuracy" in table and "defended/dager@coordinator/token_accuracy" in table
    assert table.count("FAIL") == 2 and ">= 0.95" in table and "<= 0.05" in table


def test_update_sets_bounds_from_the_values_with_the_margin(tmp_path):
    scores = {"base": [_res(token_accuracy=1.0)], "defended": [_res(token_accuracy=0.0)]}
    checks = [MIN, dict(MAX, margin=0.1), dict(MIN, metric="rouge1", min=0.5)]
    new = updated_checks(evaluate(checks, scores), margin=0.05)
    assert new[0]["min"] == 0.95 and new[0]["value"] == 1.0
    assert new[1]["max"] == 0.1 and new[1]["value"] == 0.0       # the check's own margin
    assert new[2] == checks[2]                                   # no value: left as it was
    path = tmp_path / "baseline.yaml"
    path.write_text("# header kept\nmargin: 0.05\nscenarios:\n- {id: base, file: x.yaml}  # layout kept\n"
                    "- {id: defended, file: x.yaml}\nchecks:\n  - {scenario: base}\n")
    (tmp_path / "x.yaml").write_text("name: x\n")
    write_baseline(path, new)
    text = path.read_text()
    assert text.startswith("# header kept\n") and "- {id: base, file: x.yaml}  # layout kept\n" in text
    assert load_baseline(path)["checks"] == new


def test_a_bad_baseline_lists_every_problem(tmp_path, capsys):
    path = tmp_path / "baseline.yaml"
    path.write_text(yaml.safe_dump({
        "scenarios": [{"id": "a", "file": "missing.yaml", "sett": {}}],
        "checks": [{"scenario": "b", "attack": "dager", "metric": "m", "min": 1, "max": 2},
                   {"scenario": "a", "attack": "dager", "metric": "m", "max": "high"}]}))
    with pytest.raises(ConfigError) as exc:
        load_baseline(path)
    assert exc.value.problems == [
        "scenarios.0.sett: unknown key; valid: attacks, file, id, note, set",
        "scenarios.0.file: missing.yaml not found",
        "checks.0.scenario: unknown scenario 'b'; valid: a",
        "checks.0: needs exactly one of min / max (got ['min', 'max'])",
        "checks.1.max: must be a number (got 'high')"]
    assert main(["--baseline", str(path)]) == 2
    assert "5 problem(s)" in capsys.readouterr().err


def test_committed_baseline_is_valid_and_has_both_directions():
    data = load_baseline(DEFAULT_BASELINE)
    assert DEFAULT_BASELINE == ROOT / "privacy-baseline.yaml"
    assert {"min", "max"} <= {d for c in data["checks"] for d in ("min", "max") if d in c}
    for sc in data["scenarios"]:
        assert sc["attacks"], sc["id"]


def test_weakened_defence_fails_the_gate_and_restoring_it_passes(tmp_path):
    """The committed noised FedSGD scenario with its noise set to 0 leaks like the undefended
    one: the gate names the failing checks.  With the committed noise it passes."""
    noised = "fedsgd-tiny-noised"
    data = load_baseline(DEFAULT_BASELINE)
    committed = next(s for s in data["scenarios"] if s["id"] == noised)["set"]["defences"]
    weakened = [dict(d, sigma=0.0) if d["type"] == "noise" else d for d in committed]
    results, runs = run_regress(overrides={noised: {"defences": weakened}}, only=[noised],
                                runs_root=tmp_path / "weak")
    assert all(r.ok for r in runs), [r.error for r in runs]
    failed = [r.name for r in results if not r.passed]
    assert f"{noised}/dager@coordinator/token_accuracy" in failed
    assert f"{noised}/bag-of-tokens@coordinator/token_set_precision" in failed
    assert all(r.value is not None for r in results)
    results, runs = run_regress(only=[noised], runs_root=tmp_path / "restored")
    assert results and all(r.passed for r in results), format_table(results)
