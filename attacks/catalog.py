"""The registered attacks as plain data: threat model, targeted protocols and kinds, options.

``python -m attacks list``, the commands' help and scenario validation read this table from
``attacks/catalog.json`` so that they answer without importing torch; the attacks themselves
stay the source of truth.  After adding an attack or changing one's threat model, targets or
options, regenerate it (a test fails until the file matches the classes):

    python -m attacks.catalog --write
"""
import json
import sys
from functools import lru_cache
from pathlib import Path

from testbed.errors import ConfigError

from .base import Attack, ThreatModel

FILE = Path(__file__).with_name("catalog.json")


def build_catalog():
    """{name: description} from the attack classes themselves (imports every attack)."""
    from .registry import attack_names, get_attack
    out = {}
    for name in attack_names():
        a = get_attack(name)
        out[name] = {"threat_model": a.threat_model.to_json(),
                     "targets": {p: list(k) for p, k in a.targets.items()},
                     "options": dict(a.options)}
    return out


@lru_cache(maxsize=1)
def load_catalog():
    """{name: description} as committed in catalog.json (no torch import)."""
    return json.loads(FILE.read_text())


class CatalogAttack(Attack):
    """An attack's description without its code: enough to check names and options."""

    def __init__(self, name, entry):
        tm = entry["threat_model"]
        self.name = name
        self.threat_model = ThreatModel(observers=tuple(tm["observers"]), knowledge=frozenset(tm["knowledge"]),
                                        summary=tm["summary"])
        self.targets = {p: tuple(k) for p, k in entry["targets"].items()}
        self.options = entry["options"]


def describe(name):
    """The catalog's :class:`CatalogAttack` for ``name``; ValueError listing the valid names."""
    cat = load_catalog()
    if name not in cat:
        raise ValueError(f"unknown attack {name!r}; valid: {', '.join(cat)}")
    return CatalogAttack(name, cat[name])


def spec_problems(specs, where="attacks"):
    """Problems of a scenario's ``attacks:`` list (names, keys, option names and types), from
    the catalog: the same checks as :func:`attacks.runner.parse_specs`, without torch."""
    from .runner import parse_specs
    try:
        parse_specs(specs, where, lookup=describe)
    except ConfigError as exc:
        return [f"{where}.{p}" for p in exc.problems]
    return []


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m attacks.catalog --write")
    FILE.write_text(json.dumps(build_catalog(), indent=1) + "\n")
    print(f"wrote {FILE}")
