"""What every attack is built from: its threat model, its output, and the Attack base class.

An attack is one class in one file (``attacks/<name>.py`` exporting ``ATTACK``) with

* ``name``          -- the registry name (``dager``, ``bag-of-tokens``, ...);
* ``threat_model``  -- a :class:`ThreatModel`: which observer it plays, which public
  knowledge it may use; the :class:`~attacks.view.AdversaryView` refuses anything else;
* ``targets``       -- protocol name -> the capture message kinds it consumes;
* ``options``       -- option name -> default value (checked by :meth:`Attack.resolve_options`);
* ``run(view, **options) -> list[Reconstruction]`` -- the single entry point.

The attack never sees ``truth/``: reconstructions are scored afterwards by
:mod:`attacks.score`, aligned by ``(protocol, party, step, row)``.
"""
from dataclasses import asdict, dataclass, field
from typing import Optional

from testbed.errors import ConfigError

# Public knowledge an AdversaryView can grant (see attacks.view.AdversaryView).
KNOWLEDGE = {
    "config": "the protocol's public hyperparameters (model shape, batch size, sequence length)",
    "tokenizer": "the shared tokenizer (public/tokenizer.json)",
    "init_model": "the shared starting checkpoint (public/init-model)",
    "aux_text": "public auxiliary text from the same generator, another seed, no canaries",
}


@dataclass(frozen=True)
class ThreatModel:
    """Who the adversary is and what it knows besides the traffic it observes.

    ``observers``: the roles the attack may play (``coordinator``, ``server``, ``cloud``,
    ``party-*``, ``wire``); ``knowledge``: keys of :data:`KNOWLEDGE`; ``summary``: one
    sentence for reports.
    """

    observers: tuple
    knowledge: frozenset = frozenset({"config", "tokenizer", "init_model"})
    summary: str = ""

    def __post_init__(self):
        unknown = set(self.knowledge) - set(KNOWLEDGE)
        if unknown:
            raise ValueError(f"ThreatModel.knowledge: unknown {sorted(unknown)}; "
                             f"valid: {', '.join(KNOWLEDGE)}")

    def to_json(self):
        return {"observers": list(self.observers), "knowledge": sorted(self.knowledge),
                "summary": self.summary}


# The FedSGD aggregator of the gradient-inversion papers (DAGER, TAG, LAMP).
FEDSGD_AGGREGATOR = ThreatModel(
    observers=("coordinator", "wire"),
    knowledge=frozenset({"config", "init_model"}),
    summary="honest-but-curious aggregator: sees each party's gradient, knows the weights "
            "it was computed at (starting checkpoint + broadcast updates) and the batch shape")


KINDS = ("sequence", "set", "routed")


@dataclass
class Reconstruction:
    """One reconstructed private input, as the attack reports it.

    ``kind`` is ``"sequence"`` (``token_ids`` in order, one batch row), ``"set"``
    (``token_ids`` = the tokens believed present anywhere in the batch) or ``"routed"``
    (``token_ids`` = one token per row of a PC-MoE expert message, in message order;
    ``meta`` has its ``layer`` and ``host``; the scorer places them by position).  ``row`` is the
    row of the party's batch when the attack knows it, else ``None`` and the scorer
    matches reconstructions to rows.  ``secrets`` are strings the attack claims to have
    extracted (checked against the planted canaries).
    """

    protocol: str
    party: str
    step: int
    token_ids: list
    row: Optional[int] = None
    kind: str = "sequence"
    secrets: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Reconstruction.kind: expected one of {', '.join(KINDS)} (got {self.kind!r})")
        self.token_ids = [int(t) for t in self.token_ids]

    @property
    def batch(self):
        """The key that aligns this reconstruction with ``truth/tokens.jsonl``."""
        return (self.protocol, self.party, self.step)

    def to_json(self):
        return asdict(self)


class Attack:
    """Base class. Subclasses set the class attributes and implement :meth:`run`."""

    name = ""
    threat_model = ThreatModel(observers=())
    targets = {}   # protocol -> tuple of message kinds consumed
    replays = {}   # protocol -> kinds it reads at every step before an attacked one
    options = {}   # option -> default
    # seconds this instance spent on work its observers share (an attacker model trained once
    # and reused): the runner reports it apart from each observer's own seconds
    shared_seconds = 0.0

    def applies_to(self, protocol):
        return protocol in self.targets

    def kinds(self, protocol):
        return tuple(self.targets.get(protocol, ()))

    def capture_needs(self, protocol, options):
        """What the capture must keep for this attack: ``(steps, every_step_kinds)``.

        ``steps``: the steps whose tensors it reads (None: every step), from its resolved
        ``steps`` option; ``every_step_kinds``: the kinds it replays from the start of the
        run (:attr:`replays`).  Attacks reading more than their ``steps`` override this."""
        steps = options.get("steps")
        return (None if steps is None else sorted({int(s) for s in steps}),
                tuple(self.replays.get(protocol, ())))

    def resolve_options(self, options, where=None):
        """Defaults overlaid with ``options``; unknown keys or wrong types raise ConfigError."""
        where = where or f"attacks.{self.name}.options"
        out, problems = dict(self.options), []
        for key, value in (options or {}).items():
            if key not in self.options:
                valid = ", ".join(sorted(self.options)) or "(none)"
                problems.append(f"{key}: unknown option; valid: {valid}")
                continue
            default = self.options[key]
            if default is not None and value is not None and not _same_kind(default, value):
                problems.append(f"{key}: expected {type(default).__name__} (got {value!r})")
                continue
            if isinstance(default, float):
                value = float(value)
            elif isinstance(default, int) and not isinstance(default, bool):
                value = int(value)
            out[key] = value
        if problems:
            raise ConfigError(where, problems)
        return out

    def run(self, view, **options):
        """Adversary view in, reconstructions out. ``options`` are already resolved."""
        raise NotImplementedError


def _same_kind(default, value):
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and \
            (isinstance(default, float) or float(value).is_integer())
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))
