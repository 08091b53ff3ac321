"""Seeds and 95% confidence intervals: the statistics, the parent/child run layout, the
summary, the report and the sweep."""
import json
import math

import pytest
import yaml

from testbed.cli import main as cli_main
from testbed.errors import ConfigError
from testbed.run.seeds import parse_seeds, run_seeds
from testbed.run.summary import best_eval_loss
from testbed.stats import T975, claim, mean_ci, paired, t975

from conftest import ROOT, tiny_scenario


def test_mean_ci_uses_students_t():
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["sd"] == 1.0 and ci["n"] == 3
    assert ci["half"] == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    assert mean_ci([2.5])["half"] is None and mean_ci([])["mean"] is None
    d = paired([2.0, 2.1, 2.2], [1.0, 1.2, 1.3])      # differences 1.0, 0.9, 0.9
    assert d["mean"] == pytest.approx(14 / 15)
    assert t975(40) == pytest.approx(2.0211, abs=1e-3) and t975(1000) == pytest.approx(1.9623, abs=1e-3)
    with pytest.raises(ValueError, match="df"):
        t975(0)


def test_t_table_matches_scipy():
    st = pytest.importorskip("scipy.stats")
    for df, v in T975.items():
        assert v == pytest.approx(float(st.t.ppf(0.975, df)), abs=1e-4)
    for df in (31, 45, 80, 200):
        assert t975(df) == pytest.approx(float(st.t.ppf(0.975, df)), abs=1e-3)


def test_a_difference_smaller_than_its_ci_is_no_difference():
    assert claim(paired([2.0, 2.3, 1.8], [2.0, 2.0, 2.0])) == "no difference"
    assert claim(paired([2.5, 2.6, 2.55], [2.0, 2.1, 2.0])).startswith("+0.5167 ± ")
    assert "no CI" in claim(mean_ci([0.3]))


def test_best_eval_loss_picks_each_models_best_step():
    evals = [  # local: two models (roles), each its own best; centralized: one model, one step
        {"role": "party-0", "party": "party-0", "step": -1, "eval_loss": 0.1},   # untrained: ignored
        {"role": "party-0", "party": "party-0", "step": 1, "eval_loss": 3.0},
        {"role": "party-0", "party": "party-0", "step": 3, "eval_loss": 2.0},
        {"role": "party-1", "party": "party-1", "step": 1, "eval_loss": 1.0},
        {"role": "party-1", "party": "party-1", "step": 3, "eval_loss": 4.0}]
    assert best_eval_loss(evals) == 1.5
    site = [{"role": "site", "party": "party-0", "step": 1, "eval_loss": 1.0},
            {"role": "site", "party": "party-1", "step": 1, "eval_loss": 5.0},
            {"role": "site", "party": "party-0", "step": 3, "eval_loss": 2.0},
            {"role": "site", "party": "party-1", "step": 3, "eval_loss": 3.0}]
    assert best_eval_loss(site) == 2.5                   # step 3's mean, not the per-party minima


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("3-5") == [3, 4, 5]
    for bad in ("a,b", "1,1", ""):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    with pytest.raises(ConfigError, match="seeds: must be a non-empty list"):
        tiny_scenario(seeds=[1, 1])


def test_seeds_run_one_child_per_seed_and_summarize_mean_and_ci(tmp_path):
    sc = tiny_scenario(training={"steps": 2, "eval_every": 1})
    parent, summary = run_seeds(sc, [0, 1, 2], runs_root=tmp_path / "runs", base_dir=ROOT,
                                cache_dir=tmp_path / "cache", progress=False)
    man = json.loads((parent / "manifest.json").read_text())
    assert man["kind"] == "seeds" and man["status"] == "ok" and man["children"] == ["seed-0", "seed-1", "seed-2"]
    children = []
    for s in (0, 1, 2):
        child = parent / f"seed-{s}"
        assert yaml.safe_load((child / "scenario.yaml").read_text())["seed"] == s   # ordinary run dirs
        assert json.loads((child / "manifest.json").read_text())["seed"] == s
        children.append(json.loads((child / "summary.json").read_text()))
    assert json.loads((parent / "summary.json").read_text()) == summary
    for name in ("local", "centralized"):
        finals = [c["protocols"][name]["mean_eval_loss"] for c in children]
        assert summary["protocols"][name]["final"] == mean_ci(finals)
        assert summary["protocols"][name]["per_seed"]["final"] == finals
    assert len({round(c["protocols"]["local"]["mean_eval_loss"], 9) for c in children}) == 3  # seeds differ
    ref = [c["protocols"]["centralized"]["best_eval_loss"] for c in children]
    assert summary["protocols"]["local"]["best_vs_reference"] == paired(
        [c["protocols"]["local"]["best_eval_loss"] for c in children], ref)
    # one seed keeps the ordinary layout
    one, s1 = run_seeds(sc, [4], runs_root=tmp_path / "one", base_dir=ROOT,
                        cache_dir=tmp_path / "cache", progress=False)
    assert (one / "metrics.jsonl").is_file() and json.loads((one / "manifest.json").read_text())["seed"] == 4


def test_cli_seeds_key_report_and_sweep(tmp_path, capsys):
    sc = tiny_scenario(name="tiny-seeds", seeds=[0, 1], training={"steps": 2, "eval_every": 1}).resolved()
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sc))
    assert cli_main(["run", str(path), "--runs", str(tmp_path / "runs"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 seeds: 0, 1" in out and "final - centralized" in out
    parent = next((tmp_path / "runs").iterdir())
    assert sorted(p.name for p in parent.iterdir() if p.is_dir()) == ["seed-0", "seed-1"]
    assert cli_main(["run", str(path), "--seeds", "5", "--runs", str(tmp_path / "single"),
                     "--no-progress"]) == 0
    single = next((tmp_path / "single").iterdir())
    assert (single / "metrics.jsonl").is_file()         # --seeds overrides seeds:, one seed: plain run
    from testbed.report import build_report
    rep = build_report([parent])
    md = (rep / "report.md").read_text()
    assert rep == parent / "report" and (rep / "seeds.png").is_file()
    assert "Seeds and confidence intervals" in md and "best − centralized" in md
    rc = cli_main(["sweep", str(path), "--seeds", "0,1", "--runs", str(tmp_path / "sw"), "--no-report"])
    out = capsys.readouterr().out
    assert rc == 0 and " ± " in out and "sweep: 1 ok" in out
