"""``python -m testbed sweep``: scenarios in parallel subprocesses, failures isolated, one report."""
import json

import yaml

from testbed.cli import main as cli_main
from testbed.cli.run import _override
from testbed.run.sweep import parse_summary, sets_from_dict
from testbed.scenario import deep_merge

from conftest import tiny_scenario


def _write(path, sc_dict):
    path.write_text(yaml.safe_dump(sc_dict, sort_keys=False))
    return path


def test_sweep_runs_two_tiny_scenarios_isolates_a_bad_one_and_reports_them(tmp_path, capsys):
    local = tiny_scenario(name="tiny-local", baselines=[]).resolved()
    central = tiny_scenario(name="tiny-central", protocol={"name": "centralized"}, baselines=[]).resolved()
    bad = dict(local, name="tiny-bad", training={**local["training"], "stepz": 3})
    files = [_write(tmp_path / f"{n}.yaml", d) for n, d in
             (("a", local), ("b", central), ("c", bad))]
    rc = cli_main(["sweep", *map(str, files), "--runs", str(tmp_path / "runs"), "--jobs", "2",
                   "--set", "training.steps=2", "-o", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert rc == 1  # one scenario failed
    lines = [x for x in out.splitlines() if x.startswith("[")]
    assert len(lines) == 3 and {x[:5] for x in lines} == {"[1/3]", "[2/3]", "[3/3]"}
    failed = [x for x in lines if "FAILED" in x]
    assert len(failed) == 1 and "c.yaml" in failed[0] and "training.stepz: unknown key" in failed[0]
    assert "sweep: 2 ok, 1 failed" in out
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert [r.rsplit("-", 2)[0] for r in runs] == ["tiny-central", "tiny-local"]
    for r in runs:  # the --set applied to every scenario
        assert yaml.safe_load((tmp_path / "runs" / r / "scenario.yaml").read_text())["training"]["steps"] == 2
        assert json.loads((tmp_path / "runs" / r / "manifest.json").read_text())["status"] == "ok"
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Comparison of 2 runs" in html and "tiny-local:local" in html and "tiny-central:centralized" in html


def test_parse_summary_skips_what_was_printed_before_it():
    summary = {"run": "runs/x", "protocols": {"local": {"mean_eval_loss": 1.5}}}
    stdout = "a protocol said {hello}\n{not json\n" + json.dumps(summary, indent=2) + "\n"
    assert parse_summary(stdout) == summary
    assert parse_summary("no json here\n") is None
    assert parse_summary('{"other": 1}\n') is None


def test_sets_from_dict_round_trips_through_the_run_command_overrides():
    over = {"model": {"num_layers": 2}, "baselines": [], "name": "a b: c",
            "defences": [{"type": "noise", "sigma": 0.01, "kinds": ["grad"]}]}
    parsed = _override(sets_from_dict(over))
    assert parsed == over
    base = {"model": {"num_layers": 1, "hidden_size": 64}, "baselines": ["local"]}
    assert deep_merge(base, parsed)["model"] == {"num_layers": 2, "hidden_size": 64}
