"""Published shapes of real models, for memory projection on the meta device.

Each entry is the model's ``config.json`` numbers written out (nothing is downloaded);
:func:`meta_model` instantiates the architecture with ``transformers`` on the meta
device, so the parameter tensors have shapes but no storage.

    from .shapes import meta_model
    model = meta_model("mixtral-8x7b")      # 46.7 B parameters, zero bytes allocated
"""
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig


@dataclass(frozen=True)
class Shape:
    """One model's architecture: family, config numbers, and where they come from."""

    family: str
    source: str
    config: dict = field(default_factory=dict)


SHAPES = {
    "mixtral-8x7b": Shape("mixtral", "mistralai/Mixtral-8x7B-v0.1 config.json", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "olmoe-1b-7b": Shape("olmoe", "allenai/OLMoE-1B-7B-0924 config.json", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        max_position_embeddings=4096, norm_topk_prob=False, tie_word_embeddings=False)),
    "qwen1.5-moe-a2.7b": Shape("qwen2_moe", "Qwen/Qwen1.5-MoE-A2.7B config.json", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=8192, norm_topk_prob=False,
        tie_word_embeddings=False)),
    "llama-2-7b": Shape("llama", "meta-llama/Llama-2-7b-hf config.json (dense reference)", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        tie_word_embeddings=False)),
}

CONFIGS = {"mixtral": MixtralConfig, "olmoe": OlmoeConfig, "qwen2_moe": Qwen2MoeConfig,
           "llama": LlamaConfig}


def shape_names():
    return list(SHAPES)


def hf_config(name):
    """The ``transformers`` config for a named shape; ValueError lists the valid names."""
    try:
        shape = SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown model shape {name!r}; valid: {', '.join(SHAPES)}") from None
    return CONFIGS[shape.family](**shape.config)


def meta_model(name):
    """The named architecture on the meta device (shapes only, no memory)."""
    cfg = hf_config(name)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)
