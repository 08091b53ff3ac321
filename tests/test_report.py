"""The report (testbed/report/) on real tiny runs: every section from saved artifacts,
missing pieces ("not run"), crashed runs, comparisons, and rendering in headless Chromium.
The runs (``quick_run``, ``fed_run``) are conftest fixtures, shared with test_report_readable.py.

The Chromium test skips when no browser is installed, except under ``CI=true`` where a
missing browser is a failure (Debian: ``apt-get install -y chromium``).
"""
import base64
import io
import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from testbed.errors import ConfigError, fmt_bytes
from testbed.report import build_report, load_run
from testbed.report.__main__ import main as report_main

IN_CI = os.environ.get("CI", "").lower() == "true"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _images(html):
    """Every <img src> of a page, decoded to PIL images (data: URIs only)."""
    from PIL import Image
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    out = []
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        out.append(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
    return out


def test_report_of_a_fedsgd_run_shows_every_section_from_its_artifacts(fed_run):
    out = build_report([fed_run])
    assert out == fed_run / "report"
    pngs = {"loss_vs_step", "loss_vs_time", "memory", "bytes_per_link", "bytes_per_step", "attacks", "epsilon"}
    assert {p.stem for p in out.glob("*.png")} == pngs
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert len(_images(html)) == len(pngs)
    assert all(img.size[0] >= 600 and img.size[1] >= 200 for img in _images(html))
    assert not re.search(r'(src|href)="(https?:|//)', html), "report must not load anything external"
    assert "<script" not in html
    assert set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)) == {f"{p}.png" for p in pngs}

    summary = json.loads((fed_run / "summary.json").read_text())
    run = load_run(fed_run)
    fed = summary["protocols"]["fedsgd"]
    # every captured byte is a byte the engine counted on a link
    assert sum(run.traffic["fedsgd"].by_step.values()) == fed["bytes"] > 0
    assert run.traffic["fedsgd"].messages == fed["messages"]
    assert f"<td class=\"num\">{fmt_bytes(fed['bytes'])}</td>" in html
    assert fmt_bytes(fed["max_party_peak"]) in html

    attack = json.loads((fed_run / "attacks" / "bag-of-tokens-coordinator.json").read_text())
    recall = attack["scores"]["token_set_recall"]
    assert re.search(r"<td>bag-of-tokens</td><td>coordinator</td><td class=\"num\">"
                     + re.escape(f"{recall:.4g}") + "</td>", html)
    last_eps = [r for r in run.events("train", "fedsgd") if r["party"] == "party-1"][-1]["epsilon"]
    assert last_eps > 0 and f"{last_eps:.4g}" in html
    assert "not run" not in html


def test_report_of_a_run_without_attacks_says_not_run(run_tiny, tmp_path):
    path, _ = run_tiny()
    assert (path / "attacks").is_dir() and not any((path / "attacks").iterdir())
    html = (build_report([path]) / "report.html").read_text()
    assert "tiny: attacks not run (attacks directory is empty)" in html
    shutil.rmtree(path / "attacks")
    out = build_report([path], tmp_path / "rep")
    html = (out / "report.html").read_text()
    assert "tiny: attacks not run (no attacks directory)" in html
    assert "no DP accounting in these runs" in html
    assert "these protocols do not communicate" in html
    assert not (out / "attacks.png").exists() and (out / "memory.png").exists()
    # compute.mode none and no traffic: every clock stays at 0, so no time plot
    assert "simulated time stayed 0" in html and not (out / "loss_vs_time.png").exists()
    assert len(_images(html)) == 2  # loss vs step, memory


def test_report_of_a_crashed_run_shows_what_was_written(fed_run, tmp_path):
    crashed = tmp_path / "crashed"
    shutil.copytree(fed_run, crashed, ignore=shutil.ignore_patterns("report"))
    (crashed / "summary.json").unlink()
    shutil.rmtree(crashed / "attacks")
    lines = (crashed / "metrics.jsonl").read_text().splitlines(keepends=True)
    (crashed / "metrics.jsonl").write_text("".join(lines[:5]) + lines[5][:20])  # a torn last line
    manifest = json.loads((crashed / "manifest.json").read_text())
    manifest.update(status="failed", error="RuntimeError: boom")
    (crashed / "manifest.json").write_text(json.dumps(manifest))
    assert len(load_run(crashed).metrics) == 5
    html = (build_report([crashed]) / "report.html").read_text()
    assert "run tiny failed: RuntimeError: boom" in html
    assert "attacks not run (no attacks directory)" in html


def test_throughput_json_and_unknown_events_are_shown_without_report_changes(fed_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fed_run, run, ignore=shutil.ignore_patterns("report"))
    (run / "throughput.json").write_text(json.dumps({
        "model": "llama-2-7b", "rank": 64,
        "networks": [{"network": "5g", "tokens_per_s": 12.5}, {"network": "wifi", "tokens_per_s": 31.0}]}))
    with open(run / "metrics.jsonl", "a") as f:
        for ratio in (8.25, 9.5):
            f.write(json.dumps({"event": "new_protocol_stat", "protocol": "fedsgd", "role": "coordinator",
                                "payload": {"per_token": 96}, "ratio": ratio}) + "\n")
        f.write(json.dumps({"event": "one_off", "protocol": "fedsgd", "split": "lowrank"}) + "\n")
    html = (build_report([run]) / "report.html").read_text()
    tp = html.split('id="privatelora-throughput"')[1].split("</section>")[0]
    assert "<td>model</td><td>llama-2-7b</td>" in tp
    assert "<td>5g</td><td class=\"num\">12.5</td>" in tp and "<td>wifi</td><td class=\"num\">31</td>" in tp
    rec = html.split('id="protocol-records"')[1].split("</section>")[0]
    assert "fedsgd: new_protocol_stat records" in rec
    assert "<th>payload.per_token</th><th>ratio</th>" in rec
    assert '<td class="num">96</td><td class="num">8.25</td>' in rec and '<td class="num">9.5</td>' in rec
    assert "fedsgd: one_off record</caption>" in rec and "<td>split</td><td>lowrank</td>" in rec
    assert 'id="protocol-records"' not in (build_report([fed_run]) / "report.html").read_text()


def test_comparison_of_two_runs_labels_them_and_lists_differences(quick_run, fed_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert report_main([str(quick_run), str(fed_run)]) == 0
    (out,) = (tmp_path / "reports").iterdir()  # default: reports/<timestamp>/
    html = (out / "report.html").read_text()
    assert "Comparison of 2 runs" in html
    # scenario names differ (quickstart, tiny): they label the series
    assert "quickstart:local" in html and "quickstart:centralized" in html and "tiny:fedsgd" in html
    assert "quickstart:pcmoe" in html and "routing-trace" in html and "embedding-nn" in html
    diff = html.split("Keys whose values differ")[1].split("</table>")[0]
    assert "<td>protocol.name</td><td>pcmoe</td><td>fedsgd</td>" in diff
    assert '<td>seed</td><td class="num">0</td><td class="num">3</td>' in diff
    assert "<td>training.seq_len</td>" not in diff  # equal in both: only in the full table
    assert yaml.safe_load((quick_run / "scenario.yaml").read_text())["training"]["seq_len"] == 16


def test_not_a_run_directory_is_a_config_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="not a run directory"):
        build_report([tmp_path])
    assert report_main([str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def _browser():
    path = os.environ.get("CHROMIUM_BIN") or next(filter(None, map(shutil.which, BROWSERS)), None)
    if path is None:
        reason = "no headless browser (chromium) installed: apt-get install -y chromium"
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return path


def _chromium(browser, profile, *args):
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_quickstart_report_renders_in_headless_chromium(quick_run, tmp_path):
    browser = _browser()
    out = build_report([quick_run], tmp_path / "report")
    url = (out / "report.html").resolve().as_uri()
    shot = tmp_path / "screenshot.png"
    proc = _chromium(browser, tmp_path / "profile-1", "--enable-logging=stderr", "--v=0",
                     f"--screenshot={shot}", "--window-size=1400,3000", url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], "console messages from the report page"
    from PIL import Image
    img = Image.open(shot).convert("L")
    assert img.size == (1400, 3000)
    lo, hi = img.getextrema()
    assert hi - lo > 100, "screenshot is blank"

    dom = _chromium(browser, tmp_path / "profile-2", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    imgs = re.findall(r"<img[^>]*>", dom.stdout)
    assert len(imgs) == len(list(out.glob("*.png"))) >= 3
    assert all('src="data:image/png;base64,' in tag for tag in imgs)
    assert "quickstart" in dom.stdout and "party-3" in dom.stdout
    # the default run's attack table, as the browser shows it
    attacks = dom.stdout.split("Privacy: attacks")[-1]   # the section, after the nav link
    assert "embedding-nn" in attacks and "routing-trace" in attacks and "party-1" in attacks
