"""Hugging Face ``transformers`` models built from a scenario's ``model`` section.

``build_model(cfg, vocab_size, seed)`` returns a randomly initialised causal LM of the
requested family (Mixtral / OLMoE / Qwen2-MoE mixtures of experts, or a dense LLaMA),
or loads ``cfg.path`` with ``from_pretrained`` (a local directory; nothing is
downloaded).  Initialisation is deterministic in ``seed`` and leaves the global RNG as
it was.
"""
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MixtralConfig, OlmoeConfig,
                          Qwen2MoeConfig)

from testbed.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config(cfg, vocab_size):
    """The ``transformers`` config object for a scenario's model section."""
    common = dict(vocab_size=vocab_size, hidden_size=cfg.hidden_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position,
                  intermediate_size=cfg.intermediate_size, pad_token_id=0, eos_token_id=1,
                  bos_token_id=1, tie_word_embeddings=False)
    if cfg.family == "llama":
        return LlamaConfig(**common)
    moe = dict(router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=True)
    if cfg.family == "mixtral":
        return MixtralConfig(**common, **moe, num_local_experts=cfg.num_experts,
                             num_experts_per_tok=cfg.top_k)
    if cfg.family == "olmoe":
        return OlmoeConfig(**common, **moe, num_experts=cfg.num_experts,
                           num_experts_per_tok=cfg.top_k, norm_topk_prob=True)
    if cfg.family == "qwen2_moe":
        common["intermediate_size"] = cfg.intermediate_size
        return Qwen2MoeConfig(**common, **moe, num_experts=cfg.num_experts,
                              num_experts_per_tok=cfg.top_k, moe_intermediate_size=cfg.intermediate_size,
                              shared_expert_intermediate_size=0, norm_topk_prob=True,
                              decoder_sparse_step=1, mlp_only_layers=[])
    raise ValueError(f"model.family: unknown family {cfg.family!r}; valid: mixtral, olmoe, qwen2_moe, llama")


def is_moe(model):
    return getattr(model.config, "num_local_experts", None) or getattr(model.config, "num_experts", None)


def build_model(cfg, vocab_size, seed, device="cpu"):
    """A fresh model (or ``from_pretrained(cfg.path)``), deterministic in ``seed``."""
    dtype = DTYPES[cfg.dtype]
    if cfg.path:
        if not (Path(cfg.path) / "config.json").exists():
            raise ConfigError("model.path", [
                f"no checkpoint at {cfg.path} (expected config.json from save_pretrained); "
                "build or copy it first (for PrivateLoRA scenarios: python -m parties.privatelora_base "
                "<scenario>)"])
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype)
        if model.config.vocab_size < vocab_size:
            raise ValueError(f"model.path {cfg.path}: vocab_size {model.config.vocab_size} is smaller "
                             f"than the tokenizer's {vocab_size}")
        return model.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config(cfg, vocab_size), dtype=dtype)
    return model.to(device)
