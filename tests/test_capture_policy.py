"""``capture.tensors``: which messages keep their tensor bytes, and that the default keeps
what the scenario's attacks read -- their results equal those on a full capture."""
import json

import pytest
import torch
from safetensors.torch import load_file

from attacks.runner import run_attacks
from testbed.engine.codec import Message
from testbed.errors import ConfigError
from testbed.run import capture_policy
from testbed.run.capture import CaptureWriter
from testbed.run.runner import run_scenario
from testbed.scenario import load_scenario, parse_scenario, read_yaml, deep_merge

from conftest import ROOT


def write(tmp_path, tensors, steps=range(10), kinds=("act", "update")):
    """Two messages per (step, kind); returns the index lines."""
    cap = CaptureWriter(tmp_path, "p", tensors=tensors)
    for step in steps:
        for kind in kinds:
            cap.record(Message(kind=kind, src="party-0", dst="server", step=step,
                               tensors={"x": torch.full((2,), float(step))}), 10, 4, 0.0)
    cap.close()
    return [json.loads(l) for l in (tmp_path / "index.jsonl").read_text().splitlines()]


def kept(lines, kind=None):
    return sorted({r["step"] for r in lines if r["file"] and (kind is None or r["kind"] == kind)})


def selection(**cfg):
    sc = parse_scenario({"name": "x", "capture": {"tensors": cfg}})
    return capture_policy.resolve(sc.capture, "split")


def test_a_step_sample_keeps_exactly_its_steps_and_the_index_keeps_every_message(tmp_path):
    sel = selection(steps={"every": 4, "first": 2, "last": 3}, kinds=["act"], every_step=["update"])
    lines = write(tmp_path, sel)
    assert [r["seq"] for r in lines] == list(range(20))
    assert kept(lines, "act") == [0, 1, 4, 7, 8, 9]
    assert kept(lines, "update") == list(range(10))
    for r in lines:
        if r["file"]:
            t = load_file(str(tmp_path / r["file"]))[r["tensors"]["x"]["key"]]
            assert t.tolist() == [float(r["step"])] * 2
    # a step whose tensors are all dropped leaves no file behind
    assert sorted(p.name for p in (tmp_path / "tensors").iterdir()) == \
        [f"p-step{s:06d}.safetensors" for s in range(10)]


def test_a_step_list_and_kinds(tmp_path):
    lines = write(tmp_path, selection(steps=[3, 5], kinds=["update"]))
    assert kept(lines, "update") == [3, 5] and kept(lines, "act") == []
    assert len(lines) == 20


def test_true_false_and_setup_messages(tmp_path):
    assert kept(write(tmp_path / "a", True)) == list(range(10))
    assert kept(write(tmp_path / "b", False, steps=(-1, 0, 1))) == []
    assert kept(write(tmp_path / "c", selection(steps=[1]), steps=(-1, 0, 1))) == [-1, 1]


def test_interleaved_steps_keep_earlier_keys(tmp_path):
    lines = write(tmp_path, selection(steps={"last": 1}), steps=(0, 1, 0, 1))
    assert kept(lines) == [1]
    f = load_file(str(tmp_path / "tensors" / "p-step000001.safetensors"))
    assert len(f) == 4


def test_bad_capture_tensors_is_named():
    with pytest.raises(ConfigError) as e:
        parse_scenario({"name": "x", "capture": {"tensors": {"steps": {"every": 0}, "kind": ["a"]}}})
    text = str(e.value)
    assert "capture.tensors" in text and "every" in text and "kind" in text


def test_auto_reads_the_attacks_steps_and_replayed_kinds():
    sc = parse_scenario({"name": "x", "attacks": [{"name": "dager", "options": {"steps": [7]}},
                                                  {"name": "bag-of-tokens", "options": {"steps": [9]}}]})
    sel = capture_policy.resolve(sc.capture, "fedsgd", sc.attacks)
    assert sel.steps == {7, 9} and sel.every_step == {"update"}
    assert (sel.every, sel.first, sel.last) == (50, 4, 4)
    # an attack reading every step keeps every step
    sc = parse_scenario({"name": "x", "attacks": ["routing-trace"]})
    assert capture_policy.resolve(sc.capture, "pcmoe", sc.attacks) is True
    # whitebox replay reads every batch up to the attacked step, and the gradients
    sc = parse_scenario({"name": "x", "attacks": [{"name": "whitebox-inversion", "options": {"steps": [3]}}]})
    sel = capture_policy.resolve(sc.capture, "split", sc.attacks)
    assert sel.steps == {0, 1, 2, 3} and sel.every_step == {"grad"}


def run_both(tmp_path, path, overrides):
    """Run a scenario with a full capture and with the default; return both run paths."""
    out = {}
    # modelled (not measured) compute: message arrival order, and so the order a
    # coordinator sums gradients in, is the same in both runs
    overrides = deep_merge(overrides, {"compute": {"mode": "none"}})
    for label, tensors in (("full", True), ("default", "auto")):
        data = deep_merge(read_yaml(ROOT / path), deep_merge(overrides, {"capture": {"tensors": tensors}}))
        sc = parse_scenario(data, path)
        out[label], _ = run_scenario(sc, runs_root=tmp_path / label, base_dir=ROOT,
                                     cache_dir=tmp_path / "cache", progress=False)
    return out


def comparable(results):
    return [{k: v for k, v in r.items() if k not in ("seconds", "path")}
            | {"scores": {k: v for k, v in r.get("scores", {}).items() if k != "seconds"}}
            for r in results]


def tensor_steps(run):
    return {r["step"] for r in map(json.loads, (run / "capture" / "index.jsonl").read_text().splitlines())
            if r["file"]}


@pytest.mark.parametrize("path,overrides,attacked", [
    ("scenarios/pcmoe-tiny.yaml",
     {"training": {"steps": 14}, "attacks": [{"name": "routing-trace", "options": {"steps": [5, 6]}},
                                            {"name": "embedding-nn", "options": {"steps": [6]}}]},
     {5, 6}),
    ("scenarios/fedsgd-tiny.yaml",
     {"training": {"steps": 12}, "baselines": [], "attacks": [{"name": "dager", "options": {"steps": [6]}}]},
     {6}),
])
def test_default_capture_gives_the_attacks_the_same_results(tmp_path, path, overrides, attacked):
    runs = run_both(tmp_path, path, overrides)
    specs = overrides["attacks"]
    full, default = (run_attacks(runs[k], specs, write=False) for k in ("full", "default"))
    assert all(r["status"] == "ok" for r in full)
    assert {r["attack"] for r in full if r["reconstructions"]} == {s["name"] for s in specs}
    assert comparable(default) == comparable(full)
    steps = overrides["training"]["steps"]
    assert tensor_steps(runs["full"]) == set(range(steps)) | ({-1} & tensor_steps(runs["full"]))
    # the default keeps the attacked steps, the first and last four, and nothing else
    # beyond the replayed kinds (FedSGD's update, every step)
    sample = set(range(4)) | set(range(steps - 4, steps)) | attacked
    index = [json.loads(l) for l in (runs["default"] / "capture" / "index.jsonl").read_text().splitlines()]
    assert len(index) == len((runs["full"] / "capture" / "index.jsonl").read_text().splitlines())
    assert {r["step"] for r in index if r["file"] and r["kind"] != "update" and r["step"] >= 0} == sample


def test_pcmoe_4party_keeps_a_sample_by_default():
    sc = load_scenario(ROOT / "scenarios/pcmoe-4party.yaml")
    sel = capture_policy.resolve(sc.capture, sc.protocol.name, sc.attacks)
    kept_steps = [s for s in range(sc.training.steps) if sel.keep(s, "expert_fwd")]
    attacked = {s for a in sc.attacks for s in ((a.get("options") or {}).get("steps") or [])}
    assert kept_steps == sorted({0, 1, 2, 3, 50, 100, 150, 200, 250, 300, 350} | attacked)
    assert sel.last == 4


def test_an_attack_on_every_step_reads_the_kept_ones(tmp_path):
    data = deep_merge(read_yaml(ROOT / "scenarios/pcmoe-tiny.yaml"), {"training": {"steps": 10}})
    data["attacks"] = []   # the scenario's own attack list would keep its steps too
    run, _ = run_scenario(parse_scenario(data), runs_root=tmp_path, base_dir=ROOT,
                          cache_dir=tmp_path / "cache", progress=False)
    [res] = [r for r in run_attacks(run, ["embedding-nn"], write=False) if r["observer"] == "party-1"]
    assert res["status"] == "ok"
    assert {r["step"] for r in res["reconstructions"]} <= set(range(4)) | set(range(6, 10))
    assert {r["step"] for r in res["reconstructions"]} & {7, 8, 9}
