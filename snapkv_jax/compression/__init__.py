"""KV-cache compression methods behind one interface, and the per-layer selection entry point.

Each method is a frozen, hashable dataclass (static under jit) with a pure per-layer `select` from that
layer's prefill tensors to the kept prompt positions `[B, K, S_l]` (ascending per row and KV head, -1 holes
last; the recent window always kept). Prefill calls it inside its layer loop; `select` below is the same
function from whole-prompt queries, for tests, notebooks and oracles.

| method | paper | keeps per (layer, row, KV head) |
| --- | --- | --- |
| `SnapKVConfig` | Li et al., arXiv 2404.14469 | top C-w prefix by pooled observation-window attention + window |
| `StreamingLLM` | Xiao et al., arXiv 2309.17453 | the first `sinks` positions + the last C-sinks |
| `H2O` | Zhang et al., arXiv 2306.14048 | top C-w prefix by attention summed over all prompt queries + window |
| `RandomKV` | (baseline) | C-w seeded random prefix positions + window |
| `PyramidKV` | Cai et al., arXiv 2406.02069 | SnapKV scoring, budgets shrinking linearly with depth |
| `AdaKV` | Feng et al., arXiv 2407.11550 | SnapKV scoring, budgets shared by the KV heads of a layer |
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from snapkv_jax.compression.adakv import AdaKV
from snapkv_jax.compression.base import LayerInputs, Method
from snapkv_jax.compression.h2o import H2O, query_scores
from snapkv_jax.compression.pyramid import PyramidKV
from snapkv_jax.compression.random_kv import RandomKV
from snapkv_jax.compression.scoring import resolve_impl
from snapkv_jax.compression.streaming import StreamingLLM

__all__ = ["AdaKV", "H2O", "LayerInputs", "Method", "PyramidKV", "RandomKV", "StreamingLLM", "check_method",
           "layer_inputs", "select"]


def check_method(method, num_layers: int | None = None) -> None:
    """Raises ValueError unless `method` is None or a compression method that fits `num_layers`."""
    if method is None:
        return
    if not isinstance(method, Method):
        raise ValueError(f"compress must be None or a compression method (snapkv_jax.SnapKVConfig, "
                         f"StreamingLLM, H2O, RandomKV, PyramidKV, AdaKV), got {type(method).__name__}")
    if num_layers is not None:
        method.check_model(num_layers)


def window_queries(queries: jax.Array, lengths: jax.Array, window: int) -> jax.Array:
    """`[B, H, w, D]` queries of positions L-w .. L-1 from `[B, H, T, D]` (clipped at 0 for rows
    shorter than the window, which no method compresses)."""
    idx = jnp.clip(lengths[:, None] - window + jnp.arange(window), 0, queries.shape[2] - 1)  # [B, w]
    return jnp.take_along_axis(queries, idx[:, None, :, None], axis=2)


def layer_inputs(method: Method, queries: jax.Array, keys: jax.Array, lengths: jax.Array) -> LayerInputs:
    """What `method` needs of a layer, from whole-prompt queries `[B, H, T, D]` and keys `[B, K, T, D]`."""
    w = method.observation_window
    return LayerInputs(
        keys=keys, lengths=lengths,
        q_window=window_queries(queries, lengths, w) if w else None,
        query_scores=query_scores(queries, keys, lengths) if method.needs_query_scores else None)


def select(method: Method, queries: jax.Array, keys: jax.Array, lengths: jax.Array, *, layer: int = 0,
           num_layers: int = 1, impl: str = "auto") -> jax.Array:
    """Kept prompt positions of layer `layer` of `num_layers`: `[B, K, method.slots(layer, num_layers)]`.

    queries `[B, H, T, D]` (every prompt position, after RoPE, unscaled), keys `[B, K, T, D]` (after
    RoPE), lengths `[B]`. Rows with L <= method.threshold(layer) keep 0 .. L-1 then -1. Raises ValueError
    for a bad method, mismatched shapes or an unknown `impl`.
    """
    check_method(method, num_layers)
    if queries.ndim != 4 or keys.ndim != 4 or lengths.ndim != 1:
        raise ValueError(f"expected queries [B, H, T, D], keys [B, K, T, D], lengths [B]; got shapes "
                         f"{queries.shape}, {keys.shape}, {lengths.shape}")
    b, h, t, d = queries.shape
    if keys.shape[0] != b or keys.shape[2:] != (t, d) or h % keys.shape[1] or lengths.shape != (b,):
        raise ValueError(f"queries {queries.shape}, keys {keys.shape} and lengths {lengths.shape} do not match")
    impl = resolve_impl(impl, keys.shape[3])
    lengths = jnp.asarray(lengths, jnp.int32)
    idx = _select(queries, keys, lengths, method=method, layer=layer, num_layers=num_layers, impl=impl)
    return idx[:, :, :method.slots(layer, num_layers)]


@functools.partial(jax.jit, static_argnames=("method", "layer", "num_layers", "impl"))
def _select(queries, keys, lengths, *, method, layer, num_layers, impl):
    return method.select(layer_inputs(method, queries, keys, lengths), layer, num_layers, impl)
