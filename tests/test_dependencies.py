"""The protocols' paths use no deprecated transformers API, and the installed packages are inside
the ranges pyproject.toml declares (the ranges the tests ran on)."""
import tomllib
import warnings
from importlib.metadata import version

from packaging.requirements import Requirement

from conftest import ROOT


def test_installed_packages_are_inside_the_declared_ranges():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    outside = []
    for dep in deps:
        req = Requirement(dep)
        have = version(req.name)
        if not req.specifier.contains(have, prereleases=True):
            outside.append(f"{req.name} {have} not in {req.specifier}")
    assert not outside, outside


def test_pcmoe_and_privatelora_runs_raise_no_deprecation_warning(run_tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(?!parties|testbed|attacks)")
        run_tiny(protocol={"name": "pcmoe"}, baselines=[])
        run_tiny(protocol={"name": "privatelora"}, baselines=[], parties={"count": 1},
                 model={"family": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                        "num_kv_heads": 1, "intermediate_size": 48})
