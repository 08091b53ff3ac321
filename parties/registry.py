"""Protocol registry: protocol name -> the module that defines it and the class's name.

Adding a protocol is adding a module and a line to ``PROTOCOLS``; an unknown name raises
a ValueError listing the valid ones.  This module imports nothing from the project, so
the scenario schema may read the names without importing any protocol.
"""
import importlib

# name -> (module, class)
PROTOCOLS = {
    "centralized": ("parties.single_site.centralized", "Centralized"),
    "local": ("parties.single_site.local", "Local"),
    "local_token_matched": ("parties.single_site.matched", "LocalTokenMatched"),
    "local_memory_matched": ("parties.single_site.matched", "LocalMemoryMatched"),
    "pcmoe": ("parties.pcmoe.protocol", "PCMoE"),
    "pcmoe_no_sharing": ("parties.pcmoe.protocol", "PCMoENoSharing"),
    "privatelora": ("parties.privatelora.protocol", "PrivateLoRA"),
    "fedavg": ("parties.federated.fedavg", "FedAvg"),
    "fedavg_no_avg": ("parties.federated.fedavg", "FedAvgNoAverage"),
    "fedsgd": ("parties.federated.fedsgd", "FedSGD"),
    "split": ("parties.split", "Split"),
    "privatelora_full": ("parties.privatelora.full", "PrivateLoRAFull"),
    "lora": ("parties.privatelora.baselines", "Lora"),
    "device_only": ("parties.privatelora.baselines", "DeviceOnly"),
    "cloud_only": ("parties.privatelora.baselines", "CloudOnly"),
}


def protocol_names():
    """Names whose module exists in this checkout."""
    out = []
    for name, (mod, _) in PROTOCOLS.items():
        if importlib.util.find_spec(mod) is not None:
            out.append(name)
    return out


def get_protocol(name):
    if name not in protocol_names():
        raise ValueError(f"unknown protocol {name!r}; valid: {', '.join(protocol_names())}")
    mod, cls = PROTOCOLS[name]
    return getattr(importlib.import_module(mod), cls)
