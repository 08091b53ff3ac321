"""``device_only``: each device fine-tunes LoRA on the whole model, alone; see parties/lora_baselines.py."""
from .lora_baselines import DeviceOnly as PROTOCOL  # noqa: F401
