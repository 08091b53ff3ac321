"""Attack registry: an attack named ``x`` lives in ``attacks/<module>.py`` as ``ATTACK``.

Adding an attack is adding its file and one line to ``ATTACKS``; an unknown name
raises a ValueError listing the valid ones (names whose module exists in this checkout).
"""
import importlib
import importlib.util

# name -> module under attacks/
ATTACKS = {
    "bag-of-tokens": "bag_of_tokens",
    "dager": "dager",
    "tag": "tag",
    "lamp": "lamp",
    "embedding-nn": "embedding_nn",
    "whitebox-inversion": "whitebox_inversion",
    "learned-inverter": "learned_inverter",
    "lora-m-recovery": "lora_m_recovery",
    "routing-trace": "routing_trace",
}


def attack_names():
    """Registered names whose module exists in this checkout."""
    return [name for name, mod in ATTACKS.items()
            if importlib.util.find_spec(f"attacks.{mod}") is not None]


def get_attack(name):
    """A fresh instance of the attack registered as ``name``."""
    if name not in attack_names():
        raise ValueError(f"unknown attack {name!r}; valid: {', '.join(attack_names())}")
    return importlib.import_module(f"attacks.{ATTACKS[name]}").ATTACK()
