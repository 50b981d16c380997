"""Tiny random Hugging Face Llama/Mistral models, built and saved locally (no downloads)."""

from __future__ import annotations

import torch
import transformers

# Parity cases of the foundation issue: name -> HF config fields.
CASES = {
    "llama_mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "llama_gqa": dict(num_attention_heads=6, num_key_value_heads=2),
    "llama_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama_rope_llama3": dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "mistral_sliding": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8),
}


def build(case: str, seed: int = 0, std: float = 0.1):
    """A float32 eval-mode HF model for `case`, with weights drawn N(0, std) (larger than HF's default
    0.02 so that greedy argmaxes are far from ties)."""
    fields = dict(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=std,
                  eos_token_id=None, bos_token_id=None, pad_token_id=0, tie_word_embeddings=False,
                  head_dim=8)
    fields.update(CASES[case])
    if case.startswith("mistral"):
        config = transformers.MistralConfig(**fields)
        model_cls = transformers.MistralForCausalLM
    else:
        config = transformers.LlamaConfig(**fields)
        model_cls = transformers.LlamaForCausalLM
    config._attn_implementation = "eager"
    return instantiate(model_cls, config, seed)


def instantiate(model_cls, config, seed: int):
    """A seeded float32 eval-mode `model_cls(config)` whose norm weights are perturbed away from 1 (HF
    starts them at 1), so that a mis-mapped norm weight is caught."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save(model, directory, **kwargs) -> str:
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return str(directory)
