"""KV-cache compression methods behind one interface, and the per-layer selection entry point.

Each method is a frozen, hashable dataclass (static under jit) with a pure per-layer `select` from that
layer's prefill tensors to the kept prompt positions `[B, K, S_l]` (ascending per row and KV head, -1 holes
last; the recent window always kept). Prefill calls it inside its layer loop; `select` below is the same
function from whole-prompt queries, for tests, notebooks and oracles.

| method | paper | keeps per (layer, row, KV head) |
| --- | --- | --- |
| `SnapKV` (alias `SnapKVConfig`) | Li et al., arXiv 2404.14469 | top C-w prefix by pooled observation-window attention + window |
| `StreamingLLM` | Xiao et al., arXiv 2309.17453 | the first `sinks` positions + the last C-sinks |
| `H2O` | Zhang et al., arXiv 2306.14048 | top C-w prefix by attention summed over all prompt queries + window |
| `RandomKV` | (baseline) | C-w seeded random prefix positions + window |
| `PyramidKV` | Cai et al., arXiv 2406.02069 | SnapKV scoring, budgets shrinking linearly with depth |
| `AdaKV` | Feng et al., arXiv 2407.11550 | SnapKV scoring, budgets shared by the KV heads of a layer |
| `KVzip` | Kim et al., arXiv 2505.23416 | the sinks + top C-sinks by attention from a reconstruction of the context |
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from snapkv_jax.compression.adakv import AdaKV
from snapkv_jax.compression.base import LayerInputs, Method, check_lengths
from snapkv_jax.compression.h2o import H2O, query_scores
from snapkv_jax.compression.kvzip import KVzip
from snapkv_jax.compression.pyramid import PyramidKV
from snapkv_jax.compression.random_kv import RandomKV
from snapkv_jax import sharding
from snapkv_jax.compression.scoring import resolve_impl, window_scores_on_mesh
from snapkv_jax.compression.snapkv import SnapKV, SnapKVConfig
from snapkv_jax.compression.streaming import StreamingLLM

__all__ = ["AdaKV", "H2O", "KVzip", "LayerInputs", "Method", "PyramidKV", "RandomKV", "SnapKV", "SnapKVConfig",
           "StreamingLLM", "check_method", "collect_window", "layer_inputs", "select", "select_on_mesh"]


def check_method(method, num_layers: int | None = None, name: str = "compress") -> None:
    """Raises ValueError unless `method` is None or a compression method that fits `num_layers` (`name`:
    the argument it came in, for the message)."""
    if method is None:
        return
    if not isinstance(method, Method) or type(method) is Method:
        raise ValueError(f"{name} must be None or a compression method (snapkv_jax.SnapKV, "
                         f"StreamingLLM, H2O, RandomKV, PyramidKV, AdaKV, KVzip), got {type(method).__name__}"
                         f"{' (the base class)' if type(method) is Method else ''}")
    if num_layers is not None:
        method.check_model(num_layers)


def window_queries(queries: jax.Array, lengths: jax.Array, window: int) -> jax.Array:
    """`[B, H, w, D]` queries of positions L-w .. L-1 from `[B, H, T, D]` (clipped at 0 for rows
    shorter than the window, which no method compresses)."""
    idx = jnp.clip(lengths[:, None] - window + jnp.arange(window), 0, queries.shape[2] - 1)  # [B, w]
    return jnp.take_along_axis(queries, idx[:, None, :, None], axis=2)


def collect_window(q_window, q, lengths, start):
    """Copies into `q_window [B, H, w, D]` the chunk's queries `q [B, c, H, D]` (positions start ..
    start+c-1) that are among each row's last w positions L-w .. L-1."""
    c, w = q.shape[1], q_window.shape[2]
    rel = lengths[:, None] - w + jnp.arange(w) - start                          # [B, w]
    inside = (rel >= 0) & (rel < c)
    picked = jnp.take_along_axis(q, jnp.clip(rel, 0, c - 1)[:, :, None, None], axis=1)  # [B, w, H, D]
    return jnp.where(inside[:, None, :, None], picked.transpose(0, 2, 1, 3), q_window)


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
    RoPE), lengths `[B]` (arrays or nested lists), integers in [1, T]. Rows with L <= method.threshold(layer) keep
    0 .. L-1 then -1. Raises ValueError for a bad method, mismatched shapes, bad lengths or an unknown `impl`.
    """
    check_method(method, num_layers)
    if method.reconstructs:
        raise ValueError(f"{method.name}'s scores come from the model's reconstruction of the context, not "
                         f"from a layer's queries and keys; prefill with compress= to run it")
    queries, keys, lengths = jnp.asarray(queries), jnp.asarray(keys), jnp.asarray(lengths)
    if queries.ndim != 4 or keys.ndim != 4 or lengths.ndim != 1:
        raise ValueError(f"expected queries [B, H, T, D], keys [B, K, T, D], lengths [B]; got shapes "
                         f"{queries.shape}, {keys.shape}, {lengths.shape}")
    b, h, t, d = queries.shape
    if keys.shape[0] != b or keys.shape[2:] != (t, d) or h % keys.shape[1] or lengths.shape != (b,):
        raise ValueError(f"queries {queries.shape}, keys {keys.shape} and lengths {lengths.shape} do not match")
    check_lengths(lengths, t)
    impl = resolve_impl(impl, keys.shape[3])
    lengths = jnp.asarray(lengths, jnp.int32)
    idx = _select(queries, keys, lengths, method=method, layer=layer, num_layers=num_layers, impl=impl)
    return idx[:, :, :method.slots(layer, num_layers)]


@functools.partial(jax.jit, static_argnames=("method", "layer", "num_layers", "impl"))
def _select(queries, keys, lengths, *, method, layer, num_layers, impl):
    return method.select(layer_inputs(method, queries, keys, lengths), layer, num_layers, impl)


def select_on_mesh(method: Method, inputs: LayerInputs, layer, num_layers: int, impl: str, mesh) -> jax.Array:
    """`method.select` for a layer whose inputs are split over `mesh` by row (`data`) and KV head
    (`model`); same `[B, K, S]` result as on one device.

    A `per_head` method runs on each device for the rows and KV heads it holds (`shard_map`), so no key,
    value or score leaves its device. The others (Ada-KV's budgets shared by a layer's heads, RandomKV's
    draws indexed by global head) get the observation-window scores computed per shard and select on the
    global view, where XLA gathers the `[B, K, T]` scores (never K/V) to each device.
    """
    if not method.per_head:
        if inputs.q_window is not None:
            scores = window_scores_on_mesh(inputs.q_window, inputs.keys, inputs.lengths, impl, mesh)
            inputs = inputs._replace(window_attention=scores)
        return method.select(inputs, layer, num_layers, impl)
    heads = sharding.spec(mesh, "data", "model", None, None)
    rows, scores = sharding.spec(mesh, "data"), sharding.spec(mesh, "data", "model", None)
    arrays = {"keys": inputs.keys, "lengths": inputs.lengths, "q_window": inputs.q_window,
              "query_scores": inputs.query_scores}
    specs = {"keys": heads, "lengths": rows, "q_window": heads, "query_scores": scores}
    arrays = {k: v for k, v in arrays.items() if v is not None}

    def local(arrays, layer):
        return method.select(LayerInputs(**arrays), layer, num_layers, impl)

    run = jax.shard_map(local, mesh=mesh, in_specs=({k: specs[k] for k in arrays}, sharding.spec(mesh)),
                        out_specs=scores, check_vma=False)
    return run(arrays, jnp.asarray(layer, jnp.int32))
