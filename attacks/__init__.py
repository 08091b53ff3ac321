"""Reconstruction attacks on captured traffic, scored against the private data.

    python -m attacks run runs/<id> [--attack NAME] [--observer NAME]
    python -m attacks list

Parts: :mod:`attacks.view` (what one observer saw + the public knowledge its threat model
grants; never ``truth/``), :mod:`attacks.observers` (per protocol: which observer
receives which message kinds), :mod:`attacks.base` (``Attack``, ``ThreatModel``,
``Reconstruction``), :mod:`attacks.registry`, :mod:`attacks.score` (the only reader of
``truth/``), :mod:`attacks.runner` (``run_attacks``, also called by the testbed runner for
a scenario's ``attacks:`` list) and one file per attack family.

Adding an attack: a file ``attacks/<name>.py`` with a subclass of ``attacks.base.Attack``
exported as ``ATTACK`` (docstring: threat model and paper), plus one line in
``attacks.registry.ATTACKS``.  Adding a protocol's captures: one entry in
``attacks.observers.OBSERVERS``.
"""
