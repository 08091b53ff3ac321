"""manifest.json says what produced a run: the testbed's version, git commit and a dirty flag."""
import json
import subprocess

from testbed import __version__
from testbed.rundir import RunDir, git_state

from conftest import ROOT, tiny_scenario


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_git_state_reads_the_commit_and_the_dirty_flag(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.txt").write_text("one")
    _git(repo, "add", "a.txt")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "one")
    sha = _git(repo, "rev-parse", "HEAD")
    assert len(sha) == 40
    assert git_state(repo) == {"commit": sha, "dirty": False}
    (repo / "a.txt").write_text("two")                  # a tracked file changed
    assert git_state(repo) == {"commit": sha, "dirty": True}
    _git(repo, "checkout", "-q", "a.txt")
    (repo / "new.txt").write_text("x")                  # an untracked file
    assert git_state(repo) == {"commit": sha, "dirty": True}


def test_outside_a_checkout_both_are_none(tmp_path):
    assert git_state(tmp_path) == {"commit": None, "dirty": None}


def test_the_manifest_records_version_commit_and_dirty(tmp_path):
    rd = RunDir(tmp_path, tiny_scenario())
    rd.close()
    m = json.loads((rd.path / "manifest.json").read_text())
    assert m["testbed"] == {"version": __version__, **git_state(ROOT)}
    assert m["testbed"]["commit"] == _git(ROOT, "rev-parse", "HEAD")
