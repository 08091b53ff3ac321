"""Scenario validation: every problem reported at once, with file and dotted key."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from testbed.errors import ConfigError
from testbed.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]

BAD = """
name: bad
parties:
  count: 4
  link: {up_mbps: -5, down_mbps: 100}
training:
  steps: 10
  optimiser: adamw
protocol:
  name: telepathy
"""


def test_three_mistakes_reported_together(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(BAD)
    with pytest.raises(ConfigError) as exc:
        load_scenario(f)
    probs = exc.value.problems
    text = str(exc.value)
    assert "parties.link.up_mbps: must be > 0.0 (got -5)" in probs
    assert "training.optimiser: unknown key" in probs
    assert any(p.startswith("protocol.name: unknown protocol 'telepathy'") for p in probs)
    assert len(probs) == 3
    assert text.count(f"{f}: ") == 3


def test_semantic_problems_listed_with_valid_names(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\nprotocol: {name: telepathy}\nparties: {link: moon, device: abacus}\n")
    with pytest.raises(ConfigError) as exc:
        load_scenario(f)
    text = str(exc.value)
    assert "protocol.name: unknown protocol 'telepathy'; valid: centralized, local" in text
    assert "parties.link: unknown link profile 'moon'" in text and "5g" in text
    assert "parties.device: unknown device profile 'abacus'" in text
    assert len(exc.value.problems) == 3


def test_cli_bad_scenario_one_error_no_traceback(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(BAD)
    r = subprocess.run([sys.executable, "-m", "testbed", "validate", str(f)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "3 problem(s)" in r.stderr, r.stderr
    assert r.stderr.count("bad.yaml:") >= 4


def test_cli_run_bad_scenario_exits_nonzero(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(BAD)
    r = subprocess.run([sys.executable, "-m", "testbed", "run", str(f)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_scenario(tmp_path / "nope.yaml")
    f = tmp_path / "x.yaml"
    f.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_scenario(f)


def test_model_shape_checks(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("name: x\nmodel: {hidden_size: 30, num_heads: 4, top_k: 9, num_experts: 8}\n")
    with pytest.raises(ConfigError) as exc:
        load_scenario(f)
    assert "divisible by num_heads" in str(exc.value) and "top_k 9" in str(exc.value)


def test_expert_keys_are_not_checked_for_a_dense_model(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("name: x\nmodel: {family: llama, top_k: 9, num_experts: 8}\n")
    assert load_scenario(f).model.family == "llama"


def test_defaults_are_filled_and_resolved_round_trips(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("name: x\n")
    sc = load_scenario(f)
    resolved = sc.resolved()
    assert resolved["training"]["steps"] == 60 and resolved["parties"]["link"] == "lan"
    f2 = tmp_path / "y.yaml"
    f2.write_text(yaml.safe_dump(resolved))
    assert load_scenario(f2).digest() == sc.digest()


def test_budget_sizes_parse(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("name: x\nparties: {memory_budget: 1.5GiB}\n")
    assert load_scenario(f).parties.memory_budget == int(1.5 * 2**30)
    f.write_text("name: x\nparties: {memory_budget: lots}\n")
    with pytest.raises(ConfigError, match="parties.memory_budget"):
        load_scenario(f)


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_scenarios_validate(path):
    load_scenario(path)
