"""The privacy-utility frontier: ``sweep --grid`` (parsing, checks, expansion, run names), list
items in ``--set``, the report's frontier from run directories (synthetic ones, so the numbers
are known), and one real two-point sweep of fedsgd-tiny end to end."""
import json
import random

import pytest
import yaml

from testbed.cli import main as cli_main
from testbed.cli.run import _override
from testbed.cli.sweep import _names
from testbed.errors import ConfigError
from testbed.report import build_report, load_runs
from testbed.report.frontier import frontier, swept_keys
from testbed.run.grid import expand, parse_grid, split_values
from testbed.scenario import deep_merge, load_scenario

from conftest import ROOT

TINY = str(ROOT / "scenarios" / "fedsgd-tiny.yaml")
NOISE = "defences=[{type: noise, kinds: [grad]}]"


# -- grid: parsing, expansion, names -----------------------------------------------------------

def test_grid_values_split_on_top_level_commas_and_parse_as_yaml():
    assert split_values("0, 0.1,[a, b],{x: 1, y: 2},'c,d'") == ["0", "0.1", "[a, b]", "{x: 1, y: 2}", "'c,d'"]
    assert parse_grid(["defences.0.sigma=0,0.01,0.1", "defences=[],[{type: secagg}]"]) == [
        ("defences.0.sigma", [("0", 0), ("0.01", 0.01), ("0.1", 0.1)]),
        ("defences", [("[]", []), ("[{type: secagg}]", [{"type": "secagg"}])])]


@pytest.mark.parametrize("item, says", [
    ("sigma", "'sigma': expected KEY=V1,V2,..."),
    ("defences..sigma=1", "'defences..sigma=1': expected KEY=V1,V2,..."),
    ("defences.0.sigma=", "defences.0.sigma: empty value"),
    ("defences.0.sigma=0,,1", "defences.0.sigma: empty value"),
    ("defences.0.sigma=0,0.0", "defences.0.sigma: a value is repeated"),
    ("training.lr=[1", "training.lr: '[1' is not valid YAML"),
])
def test_a_malformed_grid_is_one_line_naming_the_key(item, says):
    with pytest.raises(ConfigError) as exc:
        parse_grid([item])
    assert str(exc.value).startswith(f"--grid: {says}") and "\n" not in str(exc.value)


def test_a_key_given_twice_is_refused():
    with pytest.raises(ConfigError, match="training.lr: given twice"):
        parse_grid(["training.lr=0.1", "training.lr=0.2"])


def test_grid_expands_to_the_cartesian_product_with_names_and_sets():
    points = expand(parse_grid(["defences.0.sigma=0,0.1", "training.lr=0.001,3e-3"]))
    assert [(suffix, sets) for suffix, sets, _ in points] == [
        ("sigma0-lr0.001", ["defences.0.sigma=0", "training.lr=0.001"]),
        ("sigma0-lr3e-3", ["defences.0.sigma=0", "training.lr=3e-3"]),
        ("sigma0.1-lr0.001", ["defences.0.sigma=0.1", "training.lr=0.001"]),
        ("sigma0.1-lr3e-3", ["defences.0.sigma=0.1", "training.lr=3e-3"])]
    assert points[2][2] == {"defences.0.sigma": "0.1", "training.lr": "0.001"}
    assert expand([]) == [("", [], {})]
    assert expand(parse_grid(["defences=[],[{type: topk, fraction: 0.1}]"]))[1][0] == "defencestype-topk-fraction-0.1"
    assert _names([TINY, TINY], "STAMP", ["sigma0", "sigma0.1"]) == ["fedsgd-tiny-sigma0-STAMP",
                                                                   "fedsgd-tiny-sigma0.1-STAMP"]


def test_set_addresses_list_items_by_number():
    assert _override([NOISE, "defences.0.sigma=0.1"]) == {"defences": [{"type": "noise", "kinds": ["grad"],
                                                                         "sigma": 0.1}]}
    merged = deep_merge({"defences": [{"type": "noise", "sigma": 0.0}]}, _override(["defences.0.sigma=0.3"]))
    assert merged == {"defences": [{"type": "noise", "sigma": 0.3}]}
    assert load_scenario(TINY, _override([NOISE, "defences.0.sigma=0"])).defences[0].sigma == 0.0
    with pytest.raises(ConfigError, match=r"defences.0: no such item \(defences has 0; give the whole list"):
        load_scenario(TINY, _override(["defences.0.sigma=0.1"]))
    with pytest.raises(ConfigError, match="no item 1"):
        _override([NOISE, "defences.1.sigma=0.1"])


def test_every_defence_type_passes_the_light_checks_so_each_can_be_swept():
    import typing

    from testbed.cli.checks import DEFENCE_KEYS, light_problems
    from testbed.scenario import DefenceCfg
    types = typing.get_args(DefenceCfg.model_fields["type"].annotation)
    assert set(DEFENCE_KEYS) == set(types)
    for t in types:
        for key in DEFENCE_KEYS[t]:
            value = {"kinds": "[grad]", "bits": "int8"}.get(key, "0.5" if key != "frac_bits" else "16")
            sc = load_scenario(TINY, _override([f"defences=[{{type: {t}}}]", f"defences.0.{key}={value}"]))
            assert light_problems(sc) == [], (t, key)


@pytest.mark.parametrize("grid, says", [
    ("defences.0.sigma=-1,0.1", "--grid: defences.0.sigma=-1: must be >= 0.0 (got -1)"),
    ("defences.0.sigmaa=0,0.1", "--grid: defences.0.sigmaa: unknown key"),
    ("protocol.options.noise_sigma=0,0.1", "--grid: protocol.options.noise_sigma: unknown option"),
])
def test_a_bad_grid_key_or_value_fails_the_sweep_before_it_runs(grid, says, tmp_path, capsys):
    rc = cli_main(["sweep", TINY, "--runs", str(tmp_path / "runs"), "--set", NOISE, "--grid", grid])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: " + says) and "\n" not in err
    assert not (tmp_path / "runs").exists()


# -- the frontier from synthetic run directories -----------------------------------------------

SCENARIO = yaml.safe_load(open(TINY))


def fake_run(root, name, defences, loss, scores, epsilon=None, seed=0):
    """A finished fedsgd run: scenario, manifest, summary, metrics, attacks/<attack>-<observer>.json
    (``scores``: {(attack, observer): (token accuracy, canary recovery)})."""
    d = root / name
    (d / "attacks").mkdir(parents=True)
    (d / "scenario.yaml").write_text(yaml.safe_dump({**SCENARIO, "seed": seed, "defences": defences}))
    (d / "manifest.json").write_text(json.dumps({"scenario": SCENARIO["name"], "status": "ok"}))
    (d / "summary.json").write_text(json.dumps({"run": str(d), "protocols": {
        "fedsgd": {"mean_eval_loss": loss}, "centralized": {"mean_eval_loss": 5.0}}}))
    recs = [{"event": "eval", "protocol": "fedsgd", "party": "party-0", "step": 5, "eval_loss": loss}]
    if epsilon is not None:
        recs += [{"event": "train", "protocol": "fedsgd", "party": p, "step": 5, "loss": 6.0, "epsilon": e}
                 for p, e in (("party-0", epsilon), ("party-1", epsilon / 2))]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for (attack, observer), (tok, canary) in scores.items():
        (d / "attacks" / f"{attack}-{observer}.json").write_text(json.dumps({
            "attack": attack, "observer": observer, "protocol": "fedsgd", "status": "ok",
            "scores": {"token_accuracy": tok, "canary_recovery": canary, "rows": 4}}))
    return d


def noise(sigma):
    return [{"type": "noise", "sigma": sigma, "kinds": ["grad"]}]


@pytest.fixture
def sigma_runs(tmp_path):
    """Four settings written in a shuffled order; sigma 0.03 twice (two seeds)."""
    specs = [("s0", noise(0.0), 6.0, {("dager", "coordinator"): (1.0, 1.0), ("tag", "coordinator"): (0.4, 0.5)}),
             ("s01", noise(0.1), 7.0, {("dager", "coordinator"): (0.0, 0.0), ("tag", "coordinator"): (0.1, 0.0)}),
             ("s003a", noise(0.03), 6.4, {("dager", "coordinator"): (0.2, 0.0), ("tag", "coordinator"): (0.3, 0.25)}),
             ("s003b", noise(0.03), 6.6, {("dager", "coordinator"): (0.4, 1.0), ("tag", "coordinator"): (0.1, 0.25)}),
             ("none", [], 5.9, {("dager", "coordinator"): (0.8, 0.5), ("dager", "wire"): (1.0, 1.0)})]
    random.Random(1).shuffle(specs)
    return [fake_run(tmp_path, name, d, loss, sc, seed=1 if name == "s003b" else 0) for name, d, loss, sc in specs]


def test_frontier_points_are_sorted_by_strength_with_their_loss_and_best_success(sigma_runs):
    keys, protocol, points = frontier(load_runs(sigma_runs))
    assert (keys, protocol) == (["defences.0.sigma"], "fedsgd")
    assert [p.label for p in points] == ["σ=none", "σ=0", "σ=0.03", "σ=0.1"]
    assert [p.loss for p in points] == pytest.approx([5.9, 6.0, 6.5, 7.0])
    assert [p.token.get("dager") for p in points] == pytest.approx([1.0, 1.0, 0.3, 0.0])
    assert [p.canary.get("dager") for p in points] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert [p.token.get("tag") for p in points] == pytest.approx([None, 0.4, 0.2, 0.1])
    assert [p.canary.get("tag") for p in points] == pytest.approx([None, 0.5, 0.25, 0.0])
    assert points[0].observer["dager"] == "wire"      # the better observer of two, not the first
    assert [len(p.runs) for p in points] == [1, 1, 2, 1] and all(p.epsilon is None for p in points)


def test_frontier_orders_each_defence_by_its_own_strength_and_reads_dp_epsilon(tmp_path):
    runs = [fake_run(tmp_path, f"k{f}", [{"type": "topk", "fraction": f}], 6.0 + f, {("dager", "c"): (f, 0.0)})
            for f in (0.01, 1.0, 0.1)]
    _, _, points = frontier(load_runs(runs))
    assert [p.label for p in points] == ["fraction=1", "fraction=0.1", "fraction=0.01"]   # smaller keeps less
    runs = [fake_run(tmp_path, f"dp{z}", [{"type": "dp_sgd", "noise_multiplier": z}], 6.0, {("tag", "c"): (0.5, 0.0)},
                     epsilon=8.0 / z) for z in (2.0, 0.5)]
    _, _, points = frontier(load_runs(runs))
    assert [(p.label, p.epsilon) for p in points] == [("z=0.5", 16.0), ("z=2", 4.0)]


def test_no_frontier_for_one_run_or_for_runs_of_different_protocols(sigma_runs, tmp_path):
    runs = load_runs(sigma_runs)
    assert frontier(runs[:1]) is None
    other = tmp_path / "split"
    other.mkdir()
    (other / "scenario.yaml").write_text(yaml.safe_dump({**SCENARIO, "protocol": {"name": "split"}}))
    assert frontier(load_runs([sigma_runs[0], other])) is None
    assert swept_keys(load_runs([sigma_runs[0], sigma_runs[0]])) == []


def test_the_report_of_a_sweep_has_the_frontier_plot_and_table(sigma_runs, tmp_path):
    md = (build_report(sigma_runs, tmp_path / "report") / "report.md").read_text()
    section = md.split("## Privacy–utility frontier", 1)[1].split("\n## ", 1)[0]
    assert "![" in section and (tmp_path / "report" / "frontier.png").is_file()
    rows = [line for line in section.splitlines() if line.startswith("| σ=")]
    assert [r.split(" | ")[0] for r in rows] == ["| σ=none", "| σ=0", "| σ=0.03", "| σ=0.1"]
    assert rows[2] == "| σ=0.03 | 6.5 | 0.3 | 0.5 | 0.2 | 0.25 | 2 |"


def test_labels_of_settings_that_land_together_are_merged_not_stacked():
    from testbed.report.frontier_plot import _clusters
    best = {"σ=0": (0.30, 3.551, None), "σ=0.01": (0.31, 3.554, None), "σ=1": (0.13, 3.73, None)}
    assert _clusters(best, 1.0) == [("σ=0, 0.01", 3.554, 0.31), ("σ=1", 3.73, 0.13)]
    dp = {"z=0.3": (0.0, 6.239, 15.1), "z=1": (0.0, 6.242, 0.902)}
    assert _clusters(dp, 0.2) == [("z=0.3, ε=15.1\nz=1, ε=0.902", 6.239, 0.0)]
    assert _clusters(dp, 0.01) == [("z=0.3\nε=15.1", 6.239, 0.0), ("z=1\nε=0.902", 6.242, 0.0)]


# -- end to end ---------------------------------------------------------------------------------

def test_a_two_point_sigma_sweep_of_fedsgd_tiny_reports_its_frontier(tmp_path, capsys):
    rc = cli_main(["sweep", TINY, "--runs", str(tmp_path / "runs"), "-o", str(tmp_path / "report"),
                   "--set", "training.steps=2", "--set", "training.eval_every=2", "--set", "baselines=[]",
                   "--set", "attacks=[dager]", "--set", NOISE, "--grid", "defences.0.sigma=0,0.1"])
    assert rc == 0, capsys.readouterr()
    names = sorted(p.name.rsplit("-", 2)[0] for p in (tmp_path / "runs").iterdir())
    assert names == ["fedsgd-tiny-sigma0", "fedsgd-tiny-sigma0.1"]
    md = (tmp_path / "report" / "report.md").read_text()
    section = md.split("## Privacy–utility frontier", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| σ=")]
    assert [r[0] for r in rows] == ["| σ=0", "| σ=0.1"]
    assert float(rows[0][2]) == 1.0 and float(rows[1][2]) < 0.5    # DAGER: exact, then broken by noise
