"""snapkv-jax: SnapKV (arXiv 2404.14469) in pure JAX/Flax, beside the KV-cache compression methods it is
compared with.

    import snapkv_jax as sk
    cfg, params, tok = sk.load(checkpoint_dir)
    out = sk.generate(params, cfg, tokens, lengths, max_new_tokens=64, compress=sk.SnapKV())
    sampler = sk.Sampler(params, cfg, tok, compress=sk.SnapKV())   # text in, text out
    print(sampler.generate("Why is the sky blue?", sampling=sk.TopP(0.9, temperature=0.7)))
"""

from snapkv_jax import cache, compression, snapkv
from snapkv_jax.cache import KVCache
from snapkv_jax.checkpoint import load
from snapkv_jax.compile_cache import enable_compilation_cache
from snapkv_jax.compression import H2O, AdaKV, KVzip, Method, PyramidKV, RandomKV, SnapKV, SnapKVConfig, StreamingLLM
from snapkv_jax.config import ModelConfig, RopeScaling
from snapkv_jax.generate import GenerateOutput, decode_step, extend, forward, generate, prefill
from snapkv_jax.hf_weights import load_hf
from snapkv_jax.models.llama import fuse_projections, init_params
from snapkv_jax.sampler import Chat, Completion, Sampler, State, Stats, Stream
from snapkv_jax.sampling import Greedy, Temperature, TopK, TopP
from snapkv_jax.sharding import make_mesh, parse_mesh, shard_params

__all__ = [
    "H2O", "AdaKV", "Chat", "Completion", "GenerateOutput", "Greedy", "KVCache", "KVzip", "Method",
    "ModelConfig", "PyramidKV", "RandomKV", "RopeScaling", "Sampler", "SnapKV", "SnapKVConfig", "State", "Stats",
    "Stream", "StreamingLLM", "Temperature", "TopK", "TopP", "cache", "compression", "decode_step",
    "enable_compilation_cache", "extend", "forward", "fuse_projections", "generate", "init_params", "load",
    "load_hf", "make_mesh", "parse_mesh",
    "prefill", "shard_params", "snapkv",
]
