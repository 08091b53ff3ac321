"""Protocol registry: a protocol named ``x`` lives in ``parties/x.py`` as class ``PROTOCOL``.

Adding a protocol is adding a file and a line to ``PROTOCOLS``; an unknown name raises
a ValueError listing the valid ones.
"""
import importlib

# name -> module under parties/
PROTOCOLS = {
    "centralized": "centralized",
    "local": "local",
    "pcmoe": "pcmoe",
    "privatelora": "privatelora",
    "fedavg": "fedavg",
    "fedsgd": "fedsgd",
    "split": "split",
    "privatelora_full": "privatelora_full",
    "lora": "lora",
    "device_only": "device_only",
    "cloud_only": "cloud_only",
}


def protocol_names():
    """Names whose module exists in this checkout."""
    out = []
    for name, mod in PROTOCOLS.items():
        if importlib.util.find_spec(f"parties.{mod}") is not None:
            out.append(name)
    return out


def get_protocol(name):
    if name not in protocol_names():
        raise ValueError(f"unknown protocol {name!r}; valid: {', '.join(protocol_names())}")
    return importlib.import_module(f"parties.{PROTOCOLS[name]}").PROTOCOL
