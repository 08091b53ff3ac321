"""Who observes what, per protocol: the table attacks pick their observers from.

``OBSERVERS[protocol][observer]`` lists the capture message kinds that observer receives
and that carry information about another party's private data.  ``party-*`` stands for
every party role in the run.  ``wire`` (a network eavesdropper) sees every message of
every kind and is implicit.  Adding a protocol's captures is adding one entry here; the
kinds must match what its roles put in ``Message(kind=...)``.

An attack declares the kinds it consumes (``Attack.targets``); by default it runs as
every observer of the table that receives one of them (``wire`` only when asked for).
"""
import fnmatch

from .view import WIRE

OBSERVERS = {
    # FedSGD / FedAvg (parties/federated/rounds.py): each selected party sends its batch gradient
    # (``grad``) or its weight delta after local steps (``delta``) to the coordinator,
    # which broadcasts the weighted mean (``update``) to every party.
    "fedsgd": {"coordinator": ("grad",), "party-*": ("update",)},
    "fedavg": {"coordinator": ("delta",), "party-*": ("update",)},
    # Split learning (parties/split.py): the server receives cut-layer activations and
    # labels (``act``, ``eval_act``; U-shape: ``hidden_grad``); a party gets the gradient
    # w.r.t. its activations (``grad``; U-shape: ``hidden``, eval: ``eval_out``); under
    # SplitFed a ``fedserver`` receives every party's party-side weights.
    "split": {"server": ("act", "eval_act", "hidden_grad"), "party-*": ("grad", "hidden", "eval_out"),
              "fedserver": ("weights",)},
    # PC-MoE (parties/pcmoe*.py): an expert's host receives the hidden states of other
    # parties' tokens routed to it and, in backward, the gradient w.r.t. its output; the
    # owner gets the expert output and the gradient w.r.t. the hidden states back.  The
    # coordinator sees control messages only.
    "pcmoe": {"party-*": ("expert_fwd", "eval_expert_fwd", "expert_bwd",
                          "expert_out", "eval_expert_out", "expert_grad_in"),
              "coordinator": ()},
    # PrivateLoRA (parties/privatelora/wire.py): the cloud receives the embeddings, M·A·x
    # per layer, dL/d(hidden) and the gradients sent up; the device receives A·x, the
    # final hidden state and the gradients sent down.
    "privatelora": {"cloud": ("embed", "act_up", "grad_hidden", "grad_up"),
                    "party-*": ("act_down", "hidden", "grad_down")},
    "privatelora_full": {"cloud": ("embed", "act_up", "grad_hidden", "grad_up"),
                         "party-*": ("act_down", "hidden", "grad_down")},
    "cloud_only": {"cloud": ("data", "eval_data")},
    "centralized": {},
    "local": {},
}


def declared(protocol):
    """Observer patterns declared for ``protocol`` ({} for an unknown protocol)."""
    return OBSERVERS.get(protocol, {})


def sees(protocol, observer, kind):
    """Whether ``observer`` receives messages of ``kind`` in ``protocol``."""
    if observer == WIRE:
        return True
    return any(fnmatch.fnmatchcase(observer, pat) and kind in kinds
               for pat, kinds in declared(protocol).items())


def default_observers(protocol, kinds, roles):
    """Concrete observers among ``roles`` (roles seen in the capture) that receive one of
    ``kinds``, in the table's order; ``[]`` when none (``wire`` is never a default)."""
    out = []
    for pat, seen in declared(protocol).items():
        if not set(seen) & set(kinds):
            continue
        for role in sorted(roles, key=_role_order) if "*" in pat else [pat]:
            if fnmatch.fnmatchcase(role, pat) and role in roles and role not in out:
                out.append(role)
    return out


def _role_order(role):
    head, _, tail = role.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (role, -1)
