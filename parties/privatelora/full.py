"""``privatelora_full``: the full-hidden split that PrivateLoRA compresses (its baseline).

Same roles, schedule, adapters and math as :mod:`parties.privatelora`, but the device
holds A, M and B: per layer the cloud sends the attention's normed input x (d wide) and
receives ΔW·x for q, k, v (d_out wide each); backward sends dL/d(ΔW·x) and receives
dL/dx.  A and B come from the same seeded generator as PrivateLoRA's, so both protocols
train the same function and differ only in what crosses the wire.

    python -m testbed run scenarios/privatelora-tiny.yaml --set protocol.name=privatelora_full
"""
from .protocol import PrivateLoRA


class PrivateLoRAFull(PrivateLoRA):
    name = "privatelora_full"
    lowrank = False
