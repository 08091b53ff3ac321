"""The layers of the house stay layers: a lower layer never imports a higher one.

Every import statement in ``testbed/``, ``parties/`` and ``attacks/`` -- module level or
inside a function, absolute or relative -- is resolved to the project module it names
and checked against ``ALLOWED``: the groups each group may import (its own included).
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("testbed", "parties", "attacks")

# group -> module prefixes, most specific first (the first match wins)
GROUPS = [
    ("base", ("testbed.errors", "testbed.units", "testbed.stats", "testbed.console", "testbed.merge", "testbed")),  # "testbed": __version__ only
    ("registry", ("parties.registry",)),
    ("engine", ("testbed.engine",)),
    ("contracts", ("testbed.scenario", "testbed.rundir")),
    ("net", ("testbed.net",)),
    ("costs", ("testbed.costs",)),
    ("report", ("testbed.report",)),
    ("run", ("testbed.run",)),
    ("container", ("testbed.container",)),
    ("commands", ("testbed.cli", "testbed.regress", "testbed.__main__", "attacks.cli", "attacks.__main__")),
    ("parties", ("parties",)),
    ("attacks", ("attacks",)),
]

ALLOWED = {
    "base": set(),
    "registry": set(),
    "engine": {"base"},
    "contracts": {"base", "engine", "registry"},
    "parties": {"base", "engine", "contracts", "registry"},
    "attacks": {"base", "engine", "contracts", "registry", "parties"},
    "net": {"base", "engine"},
    "costs": {"base", "engine", "contracts", "registry", "parties"},
    "report": {"base", "contracts"},
    "run": {"base", "engine", "contracts", "registry", "parties", "attacks", "report"},
    "container": {"base", "engine", "contracts", "registry", "parties", "attacks", "net", "run"},
    "commands": {g for g, _ in GROUPS},
}


def group_of(module):
    for name, prefixes in GROUPS:
        for p in prefixes:
            if module == p or module.startswith(p + ".") and p != "testbed":
                return name
    return None


def module_name(path, root=ROOT):
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_pkg else parts), is_pkg


def imports_of(path, root=ROOT):
    """(line, imported module) for every import of a project module in ``path``."""
    mod, is_pkg = module_name(path, root)
    package = mod if is_pkg else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # "from pkg import sub": the submodule is what is imported when it exists
            for a in node.names:
                sub = f"{target}.{a.name}"
                is_sub = (ROOT / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (ROOT / Path(*sub.split("."))).is_dir()
                out.append((node.lineno, sub if is_sub else target))
    return [(line, m) for line, m in out if m.split(".")[0] in PACKAGES]


def violations(paths, root=ROOT):
    found = []
    for path in paths:
        mod, _ = module_name(path, root)
        src = group_of(mod)
        assert src is not None, f"{mod}: in no layer group; add it to GROUPS"
        for line, target in imports_of(path, root):
            dst = group_of(target)
            if dst != src and dst not in ALLOWED[src]:
                found.append(f"{path.relative_to(root)}:{line}: {src} imports {dst} ({target})")
    return found


def project_files():
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    assert all(group_of(module_name(p)[0]) for p in project_files())


def test_no_lower_layer_imports_a_higher_one():
    assert violations(project_files()) == []


@pytest.mark.parametrize("where, line, expected", [
    ("testbed/engine/codec.py", "from parties.base import party_name", "engine imports parties"),
    ("testbed/engine/sim.py", "from ..run import runner", "engine imports run"),
    ("attacks/score.py", "from testbed.run.runner import run_scenario", "attacks imports run"),
    ("parties/base.py", "import attacks.view", "parties imports attacks"),
    ("testbed/report/load.py", "from parties.models import build_model", "report imports parties"),
    ("testbed/net/engine.py", "from testbed.container import party", "net imports container"),
])
def test_a_forbidden_import_is_caught(tmp_path, where, line, expected):
    """Add one forbidden import to a copy of a real module: the check names it."""
    copy = tmp_path / where
    copy.parent.mkdir(parents=True)
    copy.write_text((ROOT / where).read_text() + f"\n\ndef _added():\n    {line}\n")
    found = violations([copy], root=tmp_path)
    assert any(expected in v for v in found), found
