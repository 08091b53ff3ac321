"""``cloud_only``: devices upload raw data, the cloud fine-tunes LoRA (the privacy floor);
see parties/lora_baselines.py."""
from .lora_baselines import CloudOnly as PROTOCOL  # noqa: F401
