"""The scoring steps SnapKV-style methods share (SnapKV, PyramidKV, Ada-KV; H2O's GQA reduction): the
observation-window scores (Pallas kernel or `jnp` reference), 1-D pooling, the GQA reduction, and the
validation of their knobs. SnapKV, arXiv 2404.14469, section 4; the steps are numbered as in
`snapkv_jax.snapkv`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from snapkv_jax import sharding
from snapkv_jax.compression.base import check_int, prefix_mask
from snapkv_jax.pallas.common import supported_head_dim
from snapkv_jax.pallas.window_scores import window_scores_reference
from snapkv_jax.pallas.window_scores import window_scores as pallas_window_scores

POOLINGS = ("maxpool", "avgpool", "none")
GQA_REDUCES = ("mean", "max")
IMPLS = ("auto", "pallas", "xla")


def pool_scores(scores: jax.Array, prefix_len: jax.Array, kernel: int, pooling: str) -> jax.Array:
    """Pools `[B, H, T]` scores along T per query head, over positions j < prefix_len[b] only.

    Positions >= prefix_len[b] act as padding (zero for "avgpool", never winning for "maxpool"); the
    returned values there are meaningless and must be masked by the caller.
    """
    if pooling == "none":
        return scores
    t = scores.shape[-1]
    in_prefix = jnp.arange(t) < prefix_len[:, None, None]                       # [B, 1, T]
    window, strides = (1, 1, kernel), (1, 1, 1)
    padding = ((0, 0), (0, 0), (kernel // 2, kernel // 2))
    if pooling == "avgpool":
        x = jnp.where(in_prefix, scores, 0.0)
        return lax.reduce_window(x, 0.0, lax.add, window, strides, padding) / kernel
    x = jnp.where(in_prefix, scores, -jnp.inf)
    return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, padding)


def reduce_gqa(scores: jax.Array, kv_heads: int, mode: str) -> jax.Array:
    """`[B, H, T]` per-query-head scores -> `[B, K, T]`, reducing the G = H // K heads of each group
    (query head h belongs to KV head h // G) by their "mean" or "max"."""
    b, h, t = scores.shape
    grouped = scores.reshape(b, kv_heads, h // kv_heads, t)                     # [B, K, G, T]
    return jnp.mean(grouped, axis=2) if mode == "mean" else jnp.max(grouped, axis=2)


def window_scores(q_window: jax.Array, keys: jax.Array, lengths: jax.Array, impl: str) -> jax.Array:
    """`[B, H, T]` observation-window scores (step 2) by the Pallas kernel (`impl="pallas"`; interpreted
    off GPU) or the `jnp` reference (`impl="xla"`)."""
    if impl == "xla":
        return window_scores_reference(q_window, keys, lengths)
    return pallas_window_scores(q_window, keys, lengths, interpret=jax.default_backend() != "gpu")


def window_scores_on_mesh(q_window: jax.Array, keys: jax.Array, lengths: jax.Array, impl: str,
                          mesh) -> jax.Array:
    """`window_scores` on a mesh: each device scores the rows (`data`) and KV heads (`model`) it holds,
    with their query heads, so no key leaves its device (the Pallas kernel cannot be partitioned by XLA;
    `shard_map` runs it per shard). Same `[B, H, T]` result as on one device."""
    heads = sharding.spec(mesh, "data", "model", None, None)
    run = jax.shard_map(functools.partial(window_scores, impl=impl), mesh=mesh,
                        in_specs=(heads, heads, sharding.spec(mesh, "data")),
                        out_specs=sharding.spec(mesh, "data", "model", None), check_vma=False)
    return run(q_window, keys, lengths)


def pooled_scores(q_window: jax.Array, keys: jax.Array, lengths: jax.Array, *, window: int, kernel: int,
                  pooling: str, gqa_reduce: str, impl: str, precomputed: jax.Array | None = None,
                  valid: jax.Array | None = None) -> jax.Array:
    """Steps 2-4: `[B, K, T]` float32 pooled, GQA-reduced window scores, -inf outside the prefix
    (j >= L - w) and at holes (`valid [B, K, T]` False). What SnapKV, PyramidKV and Ada-KV rank.
    `precomputed`: step 2's `[B, H, T]` scores when a caller already has them (then `keys` only gives
    the shape)."""
    kv_heads, t = keys.shape[1], keys.shape[2]
    scores = window_scores(q_window, keys, lengths, impl) if precomputed is None else precomputed  # [B, H, T]
    pooled = pool_scores(scores, lengths - window, kernel, pooling)
    reduced = reduce_gqa(pooled, kv_heads, gqa_reduce)                         # [B, K, T]
    return jnp.where(prefix_mask(lengths, window, t, valid), reduced, -jnp.inf)


def resolve_impl(impl: str, head_dim: int) -> str:
    """The scoring path `impl` ('auto', 'pallas' or 'xla') stands for at this head_dim; raises ValueError
    for an unknown one or a head_dim the kernel cannot take."""
    if impl not in IMPLS:
        raise ValueError(f"unknown SnapKV impl {impl!r}; use one of {IMPLS}")
    if impl == "pallas" and not supported_head_dim(head_dim):
        raise ValueError(f"impl='pallas' needs head_dim a power of two >= 16, got head_dim={head_dim}")
    if impl == "auto":
        on_gpu = jax.default_backend() == "gpu"
        return "pallas" if on_gpu and supported_head_dim(head_dim) else "xla"
    return impl



def check_scoring_knobs(method, owner: str) -> None:
    """Validates (and turns NumPy integers into ints in) the fields SnapKV-style scoring shares: window,
    capacity > window, odd kernel >= 1, pooling, gqa_reduce. Raises ValueError naming the bad value."""
    for name in ("window", "capacity", "kernel"):
        object.__setattr__(method, name, check_int(owner, name, getattr(method, name), 1))
    if method.capacity <= method.window:
        raise ValueError(
            f"{owner} capacity={method.capacity!r} must be an integer greater than window={method.window}")
    if method.kernel % 2 == 0:
        raise ValueError(f"{owner} kernel={method.kernel!r} must be an odd integer >= 1")
    if method.pooling not in POOLINGS:
        raise ValueError(f"unknown {owner} pooling {method.pooling!r}; use 'maxpool', 'avgpool' or 'none'")
    if method.gqa_reduce not in GQA_REDUCES:
        raise ValueError(f"unknown {owner} gqa_reduce {method.gqa_reduce!r}; use 'mean' or 'max'")
