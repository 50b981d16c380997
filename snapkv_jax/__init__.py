"""snapkv-jax: SnapKV (arXiv 2404.14469) in pure JAX/Flax.

    import snapkv_jax as sk
    cfg, params, tok = sk.load(checkpoint_dir)
    out = sk.generate(params, cfg, tokens, lengths, max_new_tokens=64, snap=sk.SnapKVConfig())
"""

from snapkv_jax import cache, snapkv
from snapkv_jax.cache import KVCache
from snapkv_jax.checkpoint import load
from snapkv_jax.config import ModelConfig, RopeScaling, SnapKVConfig
from snapkv_jax.generate import GenerateOutput, decode_step, forward, generate, prefill
from snapkv_jax.hf_weights import load_hf
from snapkv_jax.models.llama import init_params

__all__ = [
    "GenerateOutput", "KVCache", "ModelConfig", "RopeScaling", "SnapKVConfig", "cache", "decode_step",
    "forward", "generate", "init_params", "load", "load_hf", "prefill", "snapkv",
]
