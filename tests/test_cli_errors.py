"""Every command answers a user error with one line on stderr and a documented exit code.

A list of bad inputs is walked through ``python -m testbed`` (each command), ``python -m
attacks``, ``python -m testbed.report`` and ``python -m testbed.regress``, each in its own
process: stderr must be exactly one line starting with ``error:`` (no traceback), naming what
was wrong, and the exit code is 2 (bad arguments / bad input, see ``python -m testbed --help``).
Also: a closed stdout (``| head``) ends quietly, and the attack catalog that answers ``attacks
list`` without torch matches the attack classes.
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
Q = "scenarios/quickstart.yaml"
TINY = "scenarios/fedsgd-tiny.yaml"


def _scenario(tmp, name, **extra):
    data = yaml.safe_load((ROOT / TINY).read_text())
    for key, value in extra.items():
        cur = data
        *parents, last = key.split("__")
        for p in parents:
            cur = cur.setdefault(p, {})
        cur[last] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "empty").mkdir()
    fake = tmp / "fake-run"                       # looks like a run: scenario.yaml, empty capture
    (fake / "capture").mkdir(parents=True)
    (fake / "scenario.yaml").write_text(yaml.safe_dump({"name": "x", "protocol": {"name": "fedsgd"}}))
    (fake / "capture" / "index.jsonl").write_text("")
    (tmp / "a-file").write_text("x")
    (tmp / "bad.yaml").write_text("name: [unclosed\n")
    tb, at, rp, rg = ["-m", "testbed"], ["-m", "attacks"], ["-m", "testbed.report"], ["-m", "testbed.regress"]
    return [
        # (argv, substring of the one error line)
        (tb, "required: COMMAND"),
        (tb + ["bogus"], "invalid choice: 'bogus'"),
        (tb + ["run"], "required: scenario"),
        (tb + ["run", "missing.yaml"], "missing.yaml: file not found"),
        (tb + ["validate", "missing.yaml"], "missing.yaml: file not found"),
        (tb + ["validate", str(tmp / "bad.yaml")], "not valid YAML"),
        (tb + ["run", Q, "--set", "training.steps"], "--set: 'training.steps': expected KEY=VALUE"),
        (tb + ["run", Q, "--set", "training.steps=0"], "training.steps: must be > 0 (got 0) (given with --set)"),
        (tb + ["validate", Q, "--set", "parties.memory_budget=10XB"], "byte count (got '10XB') (given"),
        (tb + ["run", Q, "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (tb + ["run", Q, "--runs", str(tmp / "a-file")], "--runs: "),
        (tb + ["--threads", "0", "validate", Q], "--threads: must be >= 1"),
        (tb + ["validate", _scenario(tmp, "data", data__source="text", data__path="no/such.txt")],
         "data.path: no/such.txt: file not found"),
        (tb + ["validate", _scenario(tmp, "model", model__path="no/such-model")],
         "model.path: no/such-model: no such directory"),
        (tb + ["validate", _scenario(tmp, "tok", data__tokenizer__path="no/tokenizer.json")],
         "data.tokenizer.path: no/tokenizer.json: file not found"),
        (tb + ["validate", _scenario(tmp, "attack", attacks=["nope"])], "attacks.0.name: unknown attack 'nope'"),
        (tb + ["validate", _scenario(tmp, "attopt", attacks=[{"name": "dager", "options": {"bogus": 1}}])],
         "attacks.0.options.bogus: unknown option; valid:"),
        (tb + ["validate", _scenario(tmp, "defence", defences=[{"type": "noise", "bits": "int8"}])],
         "defences.0.bits: does not apply to a noise defence"),
        (tb + ["validate", _scenario(tmp, "proto", protocol={"name": "fedsgd", "options": {"bogus": 1}})],
         "protocol.options: bogus: unknown option"),
        (tb + ["up", "missing.yaml"], "missing.yaml: file not found"),
        (tb + ["up", TINY, "--mem-overhead", "3QB"], "--mem-overhead: expected a size"),
        (tb + ["sweep", TINY, "--set", "training.steps"], "--set: 'training.steps': expected KEY=VALUE"),
        (tb + ["sweep", TINY, "--jobs", "0"], "--jobs: must be >= 1"),
        (tb + ["memory", "--model", "bogus"], "unknown model shape 'bogus'"),
        (tb + ["throughput", "--device", "bogus"], "unknown profile 'bogus'"),
        (tb + ["throughput", "--dtype", "fp64"], "invalid choice: 'fp64'"),
        (at, "required: COMMAND"),
        (at + ["run"], "required: RUN_DIR"),
        (at + ["run", str(tmp / "missing")], "not a run directory (it does not exist)"),
        (at + ["run", str(tmp / "empty")], "not a run directory (no scenario.yaml)"),
        (at + ["run", str(fake), "--attack", "nope"], "unknown attack 'nope'; valid:"),
        (at + ["run", str(fake), "--attack", "dager", "--option", "bogus=1"], "--option: bogus: unknown option"),
        (at + ["run", str(fake), "--attack", "dager", "--option", "beam"], "expected KEY=VALUE"),
        (at + ["run", str(fake), "--attack", "dager", "--option", "beam=[1"], "not valid YAML"),
        (at + ["run", str(fake), "--observer", "party-9"], "'party-9' saw nothing in this fedsgd run"),
        (rp, "required: RUN_DIR"),
        (rp + [str(tmp / "missing")], "not a run directory (it does not exist)"),
        (rp + [str(tmp / "empty")], "not a run directory (none of"),
        (rp + [str(fake), "-o", str(tmp / "a-file")], "-o: "),
        (rg + ["--baseline", "missing.yaml"], "missing.yaml: file not found"),
        (rg + ["--set", "bogus"], "expected SCENARIO_ID:KEY=VALUE"),
    ]


def _run(argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_every_bad_input_is_one_line_and_exit_2(cases):
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(_run, [argv for argv, _ in cases]))
    bad = []
    for (argv, expect), r in zip(cases, results):
        lines = r.stderr.splitlines()
        ok = r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0]
        if not ok:
            bad.append(f"{' '.join(argv)}: exit {r.returncode}, stderr:\n{r.stderr}")
    print(f"{len(cases)} bad inputs, {len(cases) - len(bad)} answered in one line with exit 2")
    assert not bad, "\n".join(bad)


def test_the_doubled_got_is_gone(cases):
    r = _run(["-m", "testbed", "validate", Q, "--set", "parties.memory_budget=10XB"])
    assert r.stderr.count("(got '10XB')") == 1, r.stderr


@pytest.mark.parametrize("argv", [["-m", "attacks", "list"], ["-m", "testbed", "--help"]], ids=" ".join)
def test_a_closed_stdout_ends_quietly(argv):
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()           # the reader is gone before the command writes: `| head -0`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141)    # argparse's help ignores the pipe; commands say 141
    assert err == ""


def test_attack_catalog_matches_the_attack_classes():
    from attacks.catalog import build_catalog, load_catalog
    assert load_catalog() == json.loads(json.dumps(build_catalog())), \
        "attacks/catalog.json is stale: python -m attacks.catalog --write"


def _subparsers(parser):
    import argparse
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_command_and_option_is_described():
    """Help that reads like a manual: every command and every option has a description."""
    import argparse

    from attacks.cli import build_parser as attacks_parser
    from testbed.cli import COMMANDS, build_parser

    missing = []
    parsers = {"python -m testbed": build_parser()}
    parsers.update({f"python -m testbed {name}": _subparsers(build_parser(name))[name] for name in COMMANDS})
    parsers.update({f"python -m attacks {n}": p for n, p in _subparsers(attacks_parser()).items()})
    for prog, parser in parsers.items():
        if not parser.description:
            missing.append(f"{prog}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{prog} {c.dest}: no help" for c in action._choices_actions if not c.help]
            elif not action.help:
                missing.append(f"{prog} {'/'.join(action.option_strings) or action.dest}: no help")
        assert "``" not in parser.format_help(), f"{prog}: RST markup in the help"
    assert not missing, "\n".join(missing)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to tell 2 threads from 1")
def test_threads_option_sizes_torchs_thread_pool():
    """``--threads`` reaches torch although torch is imported after the arguments are read."""
    code = ("import sys; from testbed.cli import main; main(sys.argv[1:]); import torch; "
            "print(torch.get_num_threads())")
    for n in ("1", "2"):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TESTBED_THREADS")}
        r = subprocess.run([sys.executable, "-c", code, "--threads", n, "validate", "scenarios/quickstart.yaml"],
                           cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
        assert r.stdout.split()[-1] == n, r.stdout + r.stderr
