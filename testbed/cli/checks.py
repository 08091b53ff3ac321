"""What ``validate`` and ``run`` check beyond the scenario schema, cheapest first.

* :func:`light_problems` -- the paths the scenario names (``model.path``, ``data.path``,
  ``data.tokenizer.path``), the keys given to each defence, and the ``attacks:`` list (names,
  keys, option names and types, from :mod:`attacks.catalog`): no torch import, well under a
  second;
* :func:`protocol_problems` -- the protocol's and baselines' own checks (``protocol.options``,
  model family, shapes), by constructing each protocol on a context without data or models:
  imports the protocol modules (torch, transformers), so it runs only once the light checks pass.

Paths are resolved against ``base_dir`` (the working directory, as ``run`` does).
"""
from pathlib import Path

from testbed.errors import ConfigError

# defence type -> the keys that mean something for it (besides ``type``)
DEFENCE_KEYS = {"noise": ("sigma", "kinds"), "clip_noise": ("sigma", "clip", "kinds"),
                "quantize": ("bits", "kinds"), "topk": ("fraction", "kinds"), "secagg": ("frac_bits",),
                "santext": ("epsilon",), "dp_sgd": ("noise_multiplier", "max_grad_norm", "delta")}


def light_problems(sc, base_dir="."):
    """Every problem found without importing torch (paths, defences, attacks)."""
    return _path_problems(sc, Path(base_dir)) + _defence_problems(sc) + _attack_problems(sc)


def _path_problems(sc, base):
    problems = []
    if sc.model.path:
        p = base / sc.model.path
        how = ""
        if sc.protocol.name.startswith("privatelora"):
            how = "; pre-train it first: python -m parties.privatelora_base SCENARIO"
        if not p.is_dir():
            problems.append(f"model.path: {sc.model.path}: no such directory (a local from_pretrained "
                            f"checkpoint){how}")
        elif not (p / "config.json").is_file():
            problems.append(f"model.path: {sc.model.path}: no config.json in it (expected a "
                            f"save_pretrained directory)")
    if sc.data.source != "generate" and sc.data.path and not (base / sc.data.path).is_file():
        problems.append(f"data.path: {sc.data.path}: file not found (data.source is {sc.data.source!r})")
    tok = sc.data.tokenizer.path
    if tok and not (base / tok).is_file():
        problems.append(f"data.tokenizer.path: {tok}: file not found (expected a tokenizer.json)")
    return problems


def _defence_problems(sc):
    problems = []
    for i, d in enumerate(sc.defences):
        valid = DEFENCE_KEYS[d.type]
        for key in sorted(d.model_fields_set - {"type"} - set(valid)):
            problems.append(f"defences.{i}.{key}: does not apply to a {d.type} defence; "
                            f"valid: {', '.join(valid)}")
    return problems


def _attack_problems(sc):
    if not sc.attacks:
        return []
    from attacks.catalog import spec_problems
    return spec_problems(sc.attacks)


def protocol_problems(sc):
    """The problems the protocol classes themselves raise for this scenario (heavy imports)."""
    import torch

    from parties.base import RoleContext
    from parties.registry import get_protocol

    problems = []
    for name in dict.fromkeys([sc.protocol.name, *sc.baselines]):
        ctx = RoleContext(scenario=sc, vocab_size=sc.data.tokenizer.vocab_size,
                          parties=[None] * sc.parties.count, device=torch.device("cpu"),
                          build_model=None, protocol_name=name)
        try:
            get_protocol(name)(ctx)
        except ConfigError as exc:
            where = exc.path if exc.path.startswith(("protocol", "model", "data", "parties", "training")) \
                else f"protocol {name}: {exc.path}"
            problems += [f"{where}: {p}" for p in exc.problems]
        except ValueError as exc:
            problems.append(f"protocol {name}: {exc}")
    return problems


def check_scenario(sc, path, base_dir=".", deep=True):
    """Raise one ConfigError (naming ``path``) with every problem found; the protocol checks
    (``deep``) run only when the light ones pass."""
    problems = light_problems(sc, base_dir)
    if not problems and deep:
        problems = protocol_problems(sc)
    if problems:
        raise ConfigError(path, problems)
