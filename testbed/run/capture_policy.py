"""Which captured messages keep their tensors: the ``capture.tensors`` scenario key.

The capture index keeps one line per message whatever the policy; only the tensor
bytes are selected.  ``capture.tensors`` is

* ``true`` / ``false``: every tensor / none (metadata only);
* a mapping ``{steps, kinds, every_step}`` (:class:`testbed.scenario.CaptureTensorsCfg`):
  ``steps`` is ``all``, a list (``[0, 5, 10]``) or a sample (``{every: 50, first: 4,
  last: 4}``); ``kinds`` limits the kinds that keep tensors at those steps;
  ``every_step`` lists kinds kept at every step;
* ``auto`` (the default): what the scenario's ``attacks:`` read (their ``steps`` option,
  and the state they replay from the start, e.g. FedSGD's ``update``), plus
  :data:`DEFAULT_SAMPLE` of steps and the replayed kinds of every attack that targets the
  protocol, so attacks run later on the run directory find a useful capture.  An attack
  whose ``steps`` is unset reads every step, and then every step is kept.

Setup messages (step < 0) always keep their tensors.
"""
from testbed.scenario import CaptureStepsCfg, CaptureTensorsCfg

# Steps kept by ``auto`` beyond what the listed attacks need.
DEFAULT_SAMPLE = CaptureStepsCfg(every=50, first=4, last=4)


class TensorSelection:
    """A resolved policy: :meth:`keep` answers for every step but the last ``last`` ones,
    which the writer settles when the run ends (:meth:`in_window`)."""

    def __init__(self, steps=None, every=None, first=0, last=0, kinds=None, every_step=()):
        self.steps = None if steps is None else frozenset(steps)   # None with no sample: all
        self.every, self.first, self.last = every, first, last
        self.kinds = None if kinds is None else frozenset(kinds)
        self.every_step = frozenset(every_step)

    @property
    def everything(self):
        return self.steps is None and self.every is None and not self.first and not self.last \
            and self.kinds is None

    def _sampled(self):
        return self.every is not None or self.first or self.last

    def keep(self, step, kind):
        """Whether ``kind`` at ``step`` keeps its tensors, not counting the ``last`` rule."""
        if step < 0 or kind in self.every_step:
            return True
        if self.kinds is not None and kind not in self.kinds:
            return False
        if self.steps is None and not self._sampled():
            return True
        return (self.steps is not None and step in self.steps) \
            or (self.every is not None and step % self.every == 0) or step < self.first

    def in_window(self, kind):
        """Whether ``kind`` keeps its tensors when its step is among the last ``last``."""
        return self.last > 0 and (self.kinds is None or kind in self.kinds)

    def describe(self):
        parts = []
        if self.steps is not None:
            parts.append(f"steps {sorted(self.steps)}")
        if self.every:
            parts.append(f"every {self.every}")
        if self.first:
            parts.append(f"first {self.first}")
        if self.last:
            parts.append(f"last {self.last}")
        if self.kinds is not None:
            parts.append(f"kinds {sorted(self.kinds)}")
        if self.every_step:
            parts.append(f"every step of {sorted(self.every_step)}")
        return ", ".join(parts) or "all"


ALL = TensorSelection()


def from_config(cfg):
    """A :class:`CaptureTensorsCfg` as a :class:`TensorSelection`."""
    steps = cfg.steps
    if steps == "all":
        return TensorSelection(kinds=cfg.kinds, every_step=cfg.every_step)
    if isinstance(steps, CaptureStepsCfg):
        return TensorSelection(steps=(), every=steps.every, first=steps.first, last=steps.last,
                               kinds=cfg.kinds, every_step=cfg.every_step)
    return TensorSelection(steps=steps, kinds=cfg.kinds, every_step=cfg.every_step)


def attack_needs(protocol, attack_specs):
    """(steps or None for every step, every-step kinds) that ``attack_specs`` (a
    scenario's ``attacks:`` list) read in ``protocol``'s capture, and the kinds every
    registered attack of the protocol replays."""
    from attacks.registry import attack_names, get_attack
    from attacks.runner import parse_specs

    steps, every_step = set(), set()
    for spec in parse_specs(attack_specs):
        attack = spec["attack"]
        if not attack.applies_to(protocol):
            continue
        wanted, replayed = attack.capture_needs(protocol, spec["options"])
        every_step.update(replayed)
        if wanted is None:
            steps = None
        elif steps is not None:
            steps.update(wanted)
    for name in attack_names():
        attack = get_attack(name)
        if attack.applies_to(protocol):
            every_step.update(attack.capture_needs(protocol, dict(attack.options))[1])
    return steps, every_step


def resolve(capture_cfg, protocol, attack_specs=()):
    """The selection a run of ``protocol`` captures with: True (every tensor), False
    (none) or a :class:`TensorSelection`."""
    tensors = capture_cfg.tensors
    if isinstance(tensors, bool):
        return tensors
    if isinstance(tensors, CaptureTensorsCfg):
        sel = from_config(tensors)
        return True if sel.everything else sel
    steps, every_step = attack_needs(protocol, attack_specs)
    if steps is None:
        return True
    s = DEFAULT_SAMPLE
    return TensorSelection(steps=steps, every=s.every, first=s.first, last=s.last,
                           every_step=every_step)
