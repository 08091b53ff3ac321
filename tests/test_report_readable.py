"""The report stays readable: per-protocol loss curves with a band over parties, narrow
tables, each attack note once, no model keys a family ignores, and a caveat when the
compared runs' losses cannot be compared.

Small cases are built in memory (:class:`testbed.report.load.Run`); the rest reads the real
tiny runs of conftest (``quick_run``: PC-MoE on a Mixtral-style MoE; ``fed_run``: FedSGD on
a dense LLaMA whose scenario.yaml still carries the MoE defaults).
"""
import html
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from matplotlib.collections import PolyCollection

from testbed.report import load_run, load_runs
from testbed.report import plots
from testbed.report.build import build_document
from testbed.report.caveats import loss_caveats
from testbed.report.doc import MAX_COLUMNS, Note, Table
from testbed.report.extras import scenario_section
from testbed.report.html import render_html
from testbed.report.load import Run
from testbed.report.privacy import attacks_section
from testbed.report.sections import learning_section, overview_section
from testbed.report.series import Context, learning_series, train_band

from test_report import _browser, _chromium

MOE_KEYS = ("model.num_experts", "model.top_k", "model.router_aux_loss_coef")


def _train(protocol, party, step, loss, t):
    return {"event": "train", "protocol": protocol, "party": party, "step": step, "loss": loss, "sim_time": t}


def _eval(protocol, party, step, loss, t):
    return {"event": "eval", "protocol": protocol, "party": party, "step": step, "eval_loss": loss, "sim_time": t}


def _toy_run(tmp_path):
    """'turns': 4 parties train one step each in turn, on their own clocks; 'sync': 4 parties
    train every step at the same time, party-i's loss is 10 + i - step/10."""
    metrics = []
    for s in range(16):
        p = s % 4
        metrics.append(_train("turns", f"party-{p}", s, 5.0 + p - 0.1 * s, 0.3 * s + 0.01 * p))
        metrics += [_train("sync", f"party-{i}", s, 10.0 + i - s / 10, 0.2 * s) for i in range(4)]
    for s in (7, 15):
        metrics += [_eval(proto, f"party-{i}", s, 4.0 + i, 0.3 * s + 0.01 * i)
                    for proto in ("turns", "sync") for i in range(4)]
    return Run(path=tmp_path, scenario={"name": "toy", "protocol": {"name": "turns"}, "baselines": ["sync"]},
               metrics=metrics, label="toy")


def test_train_band_is_the_mean_and_min_max_over_parties(tmp_path):
    run = _toy_run(tmp_path)
    band = train_band(run, "sync", "step")
    assert [x for x, *_ in band] == list(range(16))
    for x, mean, lo, hi in band:
        assert (lo, mean, hi) == pytest.approx((10 - x / 10, 11.5 - x / 10, 13 - x / 10))
    # parties taking turns: each is interpolated between its own steps, never extrapolated
    turns = train_band(run, "turns", "step")
    assert turns[0][1:] == (5.0, 5.0, 5.0)           # step 0: only party-0 has started
    x, mean, lo, hi = turns[8]
    assert x == 8 and lo < mean < hi and hi - lo == pytest.approx(3.0)


def test_loss_plots_draw_one_mean_line_and_band_per_protocol(tmp_path):
    run = _toy_run(tmp_path)
    ctx = Context([run], tmp_path)
    for axis in ("step", "sim_time"):
        series = learning_series(ctx, axis)
        assert [s[0] for s in series] == ["turns", "sync"]
        assert all(len(point) == 4 for _, _, train, evals in series for point in train + evals)
        fig = plots.loss_figure(series, axis, "t")
        ax = fig.axes[0]
        labels = ax.get_legend_handles_labels()[1]
        assert sorted(labels) == ["sync eval", "sync train", "turns eval", "turns train"]
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 2                   # a shaded band per protocol (error bars are lines)


def test_learning_section_of_a_four_party_run_passes_one_series_per_protocol(quick_run, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "loss_plot", lambda series, path, xlabel, title:
                        drawn.append((xlabel, series)) or path)   # what is drawn, not the drawing
    run = load_run(quick_run)
    assert len({r["party"] for r in run.events("train", "local")}) == 4
    sec = learning_section(Context([run], tmp_path))
    assert [x for x, _ in drawn] == ["step", "simulated time (s)"]
    for _, series in drawn:
        assert [s[0] for s in series] == run.protocols == ["pcmoe", "centralized", "local"]
        for label, _, train, evals in series:
            assert train and evals and all(len(p) == 4 for p in train + evals), label
            assert all(lo <= mean <= hi for _, mean, lo, hi in train + evals)
    local = dict((s[0], s) for s in drawn[1][1])["local"]
    assert any(hi > lo for _, _, lo, hi in local[2]), "four local parties, no spread drawn"
    caption = " ".join(b.caption for b in sec.blocks if hasattr(b, "path"))
    assert "mean over parties" in caption and "min–max over parties" in caption


def _result(attack, observer, scores, notes=(), protocol="p"):
    return {"attack": attack, "observer": observer, "protocol": protocol, "status": "ok", "seconds": 1.5,
            "scores": scores, "notes": list(notes)}


ALL_SCORES = {"token_accuracy": 0.5, "rouge1": 0.4, "rouge2": 0.3, "rougeL": 0.4, "exact_match": 0.0,
              "routed_accuracy": 0.7, "canary_recovery": 0.5, "canaries_present": 2,
              "canary_rows": [{"recovered": True}], "token_set_recall": 0.6, "token_set_precision": 0.9,
              "token_set_exact": 0.0, "new_metric": 0.25, "rows": 32}


def test_score_tables_are_split_per_metric_family_and_stay_narrow(tmp_path):
    run = Run(path=tmp_path, attacks=[_result("a", "party-1", ALL_SCORES),
                                      _result("b", "server", {"token_set_recall": 0.8, "rows": 4})], label="r")
    run.scenario = {"protocol": {"name": "p"}}
    sec = attacks_section(Context([run], tmp_path))
    tables = [b for b in sec.blocks if isinstance(b, Table)]
    assert all(len(t.columns) <= MAX_COLUMNS for t in tables), [t.columns for t in tables]
    cols = {c: t for t in tables for c in t.columns}
    for col in ("tok acc", "exact", "routed", "canary", "set rec", "set exact", "new_metric",
                "rows attacked", "seconds"):
        assert col in cols, col
    assert "set rec" not in cols["tok acc"].columns   # families do not share a table
    seq = cols["tok acc"]
    assert [r[:3] for r in seq.rows] == [["p", "a", "party-1"]]   # b measured no sequence metric
    assert [r[3:] for r in cols["seconds"].rows] == [["32", "1.5"], ["4", "1.5"]]
    assert cols["canary"].rows[0][-1] == "1/2"


def test_a_note_shared_by_several_attacks_is_shown_once(tmp_path):
    same = "expert messages carry no token positions"
    results = [_result(a, f"party-{i}", {"token_accuracy": 0.1}, [same]) for a in ("x", "y") for i in (1, 2, 3)]
    results.append(_result("y", "party-1", {"token_accuracy": 0.2}, ["only once"]))
    run = Run(path=tmp_path, scenario={"protocol": {"name": "p"}}, attacks=results, label="r")
    sec = attacks_section(Context([run], tmp_path))
    (notes,) = [b for b in sec.blocks if isinstance(b, Table) and "note" in b.columns]
    assert [r[0] for r in notes.rows] == [same, "only once"]
    assert notes.rows[0][1] == "p · x (party-1, party-2, party-3); p · y (party-1, party-2, party-3)"
    assert notes.rows[1][1] == "p · y (party-1)"


def test_the_quickstart_reports_each_attack_note_once_and_every_table_is_narrow(quick_run, fed_run, tmp_path):
    notes = [n for f in (quick_run / "attacks").glob("*.json") for n in json.loads(f.read_text()).get("notes", [])]
    assert len(notes) > len(set(notes)) >= 1, "the fixture should repeat a note"
    doc = build_document(load_runs([quick_run, fed_run]), tmp_path)
    page = render_html(doc)
    for n in set(notes):
        assert page.count(html.escape(n)) == 1, n
    tables = [b for s in doc.sections for b in s.blocks if isinstance(b, Table)]
    assert tables and all(len(t.columns) <= MAX_COLUMNS for t in tables), \
        [(t.caption, len(t.columns)) for t in tables if len(t.columns) > MAX_COLUMNS]


def _keys(sec):
    return {row[0]: row[1:] for b in sec.blocks if isinstance(b, Table) and b.columns[0] == "key"
            for row in b.rows}


def test_a_dense_model_shows_no_mixture_of_experts_keys(quick_run, fed_run, tmp_path):
    dense, moe = load_run(fed_run), load_run(quick_run)
    assert dense.scenario["model"]["family"] == "llama" and "num_experts" in dense.scenario["model"]
    shown = _keys(scenario_section(Context([dense], tmp_path)))
    assert "model.hidden_size" in shown
    assert not set(MOE_KEYS) & set(shown)
    shown = _keys(scenario_section(Context([moe], tmp_path)))
    assert shown["model.num_experts"] == ["4"] and set(MOE_KEYS) <= set(shown)
    # side by side: the MoE run's value, "n/a" for the dense one
    both = load_runs([quick_run, fed_run])
    sec = scenario_section(Context(both, tmp_path))
    diff = next(b for b in sec.blocks if isinstance(b, Table) and b.caption.startswith("Keys whose"))
    assert ["model.num_experts", "4", "n/a"] in diff.rows


def _copy(run, dest, **changes):
    """A copy of a run directory with scenario keys (dotted) changed."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("report"))
    sc = yaml.safe_load((dest / "scenario.yaml").read_text())
    sc["name"] = dest.name
    for key, value in changes.items():
        *path, last = key.split(".")
        node = sc
        for k in path:
            node = node[k]
        node[last] = value
    (dest / "scenario.yaml").write_text(yaml.safe_dump(sc))
    return dest


def _caveats(runs, tmp_path):
    ctx = Context(load_runs(runs), tmp_path)
    return [[b.text for b in sec.blocks if isinstance(b, Note) and "not comparable" in b.text]
            for sec in (overview_section(ctx), learning_section(ctx))]


def test_a_caveat_says_when_losses_are_not_comparable(fed_run, tmp_path):
    a = _copy(fed_run, tmp_path / "a")
    same = _copy(fed_run, tmp_path / "same")
    vocab = _copy(fed_run, tmp_path / "vocab", **{"data.tokenizer.vocab_size": 512})
    data = _copy(fed_run, tmp_path / "data", **{"training.seq_len": 32, "data.records": 80})
    assert _caveats([a, same], tmp_path) == [[], []]
    overview, learning = _caveats([a, vocab], tmp_path)
    assert overview == learning and len(overview) == 1
    assert "vocabularies differ" in overview[0] and "data.tokenizer.vocab_size: a 300, vocab 512" in overview[0]
    (text,) = _caveats([a, data], tmp_path)[0]
    assert "different data" in text and "training.seq_len: a 16, data 32" in text and "data.records" in text
    assert "vocabularies" not in text


def test_a_caveat_reads_the_vocabulary_of_the_saved_tokenizer(tmp_path):
    runs = [Run(path=tmp_path, scenario={"data": {"tokenizer": {"vocab_size": 300}}}, vocab_size=n, label=f"r{n}")
            for n in (300, 280)]
    (text,) = loss_caveats(runs)
    assert "tokenizer vocabulary (public/tokenizer.json): r300 300, r280 280" in text
    runs[1].vocab_size = 300
    assert loss_caveats(runs) == []


def test_load_counts_the_token_ids_of_the_saved_tokenizer(fed_run):
    tok = json.loads((Path(fed_run) / "public" / "tokenizer.json").read_text())
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok["added_tokens"]]
    assert load_run(fed_run).vocab_size == max(ids) + 1 > 0


# Writes, into a copy of the page, each table's overflow as the browser lays it out.
MEASURE = ('<script>document.body.setAttribute("data-overflow", Array.from(document.querySelectorAll('
           '"table")).map(function (t) { return t.parentElement.scrollWidth - t.parentElement.clientWidth; })'
           '.join(","));</script></body>')


def test_every_table_fits_a_1000px_window_in_headless_chromium(quick_run, fed_run, tmp_path):
    browser = _browser()
    doc = build_document(load_runs([quick_run, fed_run]), tmp_path)
    page = tmp_path / "measure.html"
    page.write_text(render_html(doc).replace("</body>", MEASURE))
    dom = _chromium(browser, tmp_path / "profile", "--window-size=1000,2000", "--dump-dom", page.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    overflow = [int(x) for x in re.search(r'data-overflow="([-\d,]*)"', dom.stdout).group(1).split(",")]
    captions = [b.caption for s in doc.sections for b in s.blocks if isinstance(b, Table)]
    assert len(overflow) == len(captions) > 10
    assert [c for c, o in zip(captions, overflow) if o > 0] == []


def test_leakage_by_layer_draws_one_series_per_attack_over_its_observers(quick_run, tmp_path, monkeypatch):
    from testbed.report import privacy_plots
    drawn = []
    real = privacy_plots.layer_plot
    monkeypatch.setattr(privacy_plots, "layer_plot",
                        lambda series, path, *a: drawn.append((path.name, series)) or real(series, path, *a))
    run = load_run(quick_run)
    attacksection = attacks_section(Context([run], tmp_path))
    [series] = [s for name, s in drawn if name == "attacks_by_layer.png"]
    by_attack = {r["attack"]: 0 for r in run.attacks if isinstance((r.get("scores") or {}).get("by_layer"), dict)}
    for r in run.attacks:
        if r["attack"] in by_attack and isinstance((r.get("scores") or {}).get("by_layer"), dict):
            by_attack[r["attack"]] += 1
    assert sorted(label.split(" · ")[-1] for label, _ in series) == sorted(by_attack)
    assert {label.split(" · ")[-1]: len(obs) for label, obs in series} == by_attack
    assert max(by_attack.values()) > 1, "the quickstart's attacks have several observers"
    assert attacksection is not None


def test_final_train_loss_is_the_mean_of_each_partys_last_loss(quick_run, tmp_path):
    """PC-MoE parties take turns: the last step's loss is one party's, not the protocol's."""
    run = load_run(quick_run)
    last = {}
    for r in run.events("train", "pcmoe"):
        if r["step"] >= last.get(r["party"], (-1, None))[0]:
            last[r["party"]] = (r["step"], r["loss"])
    assert len(last) == 4
    sec = learning_section(Context([run], tmp_path))
    [table] = [b for b in sec.blocks if isinstance(b, Table) and "final train loss" in b.columns]
    [row] = [row for row in table.rows if row[0] == "pcmoe"]
    assert float(row[1]) == pytest.approx(sum(v for _, v in last.values()) / 4, abs=5e-4)
    assert int(row[2]) == max(s for s, _ in last.values())


def test_leakage_over_training_plots_success_by_the_attacked_step(quick_run, tmp_path, monkeypatch):
    """The shrunk quickstart attacks steps 0 and 3: each attack's scores carry both, and the
    report draws them against the step."""
    from testbed.report import privacy_plots
    drawn = []
    monkeypatch.setattr(privacy_plots, "layer_plot", lambda series, path, *a: drawn.append((path.name, series)) or path)
    run = load_run(quick_run)
    attacks_section(Context([run], tmp_path))
    [series] = [s for name, s in drawn if name == "attacks_by_step.png"]
    results = [r for r in run.attacks if (r.get("scores") or {}).get("by_step")]
    assert results and all(set(r["scores"]["by_step"]) == {"0", "3"} for r in results)
    for r in results:   # the per-step rows add up to the whole, and so do their accuracies
        by_step = r["scores"]["by_step"]
        assert sum(v["rows"] for v in by_step.values()) == r["scores"]["rows"]
        assert sum(v["rows"] * v["token_accuracy"] for v in by_step.values()) / r["scores"]["rows"] == \
            pytest.approx(r["scores"]["token_accuracy"])
    assert {label.split(" · ")[-1] for label, _ in series} == {r["attack"] for r in results}
