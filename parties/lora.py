"""``lora``: ordinary LoRA (peft) at one site holding every device's data; see parties/lora_baselines.py."""
from .lora_baselines import Lora as PROTOCOL  # noqa: F401
