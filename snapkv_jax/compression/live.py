"""Re-compression of a live cache: a method's selection applied to the slots one layer holds after a
segment was appended (`extend(..., compress=method)`), SnapKV's rule applied to the conversation so far.

The selection runs in *slot space*: slot i of a layer plays the part of prompt position i, and the
layer's occupied slots `n = next slot` play the part of the prompt length. Below the next slot, positions
ascend in slot order (cache.py), so "the last `window` positions" are the last `window` occupied slots
and pooling runs over slot order (neighbours in the cache, not in the original text). Empty slots inside
the occupied range (holes of per-head budgets, Ada-KV) get no attention and are never selected.

Per method (each keeps `capacity` slots of a row whose layer holds more than the method's threshold, and
leaves the others untouched, as prefill does):
  * SnapKV, PyramidKV, Ada-KV: the observation window is the segment's last `window` tokens. Their
    queries attend, in float32, to every occupied slot whose position is <= theirs (no sliding window,
    as in prefill); a segment shorter than the window contributes the queries it has, and the window's
    slots (the last `window` occupied ones) are kept whatever they hold.
  * H2O: each slot's score is the attention it received from the segment's queries (the old queries'
    scores are not stored); `normalize` divides by the number of segment queries that see the slot.
  * StreamingLLM: the first `sinks` slots and the most recent `capacity - sinks` (slot counts: on a cache
    with holes these are not position counts).
  * RandomKV: seeded priorities per slot index.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from snapkv_jax.compression.base import LayerInputs, Method
from snapkv_jax.compression.h2o import H2O


def _per_query_head(x: jax.Array, heads: int) -> jax.Array:
    """`[B, K, ...]` -> `[B, H, ...]`: query head h reads KV head h // G."""
    return jnp.repeat(x, heads // x.shape[1], axis=1)


def _probs(q: jax.Array, k: jax.Array, seen: jax.Array) -> jax.Array:
    """Float32 softmax over slots of q `[B, H, c, D]` against k `[B, K, S, D]`, where `seen [B, H, c, S]`;
    rows that see nothing get zeros."""
    logits = jnp.einsum("bhcd,bhsd->bhcs", q.astype(jnp.float32), _per_query_head(k, q.shape[1]).astype(jnp.float32),
                        precision=lax.Precision.HIGHEST) / math.sqrt(q.shape[-1])
    logits = jnp.where(seen, logits, -jnp.inf)
    top = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(seen, jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    total = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(total > 0, total, 1.0)


def window_scores(q_window: jax.Array, window_pos: jax.Array, q_valid: jax.Array, keys: jax.Array,
                  pos: jax.Array) -> jax.Array:
    """`[B, H, S]` float32 observation-window scores over a live layer: q_window `[B, H, w, D]` at
    positions `window_pos [B, w]` (only the `q_valid [B, w]` ones count), keys `[B, K, S, D]` holding
    positions `pos [B, K, S]`. Each query's softmax covers the occupied slots at or before its position."""
    h = q_window.shape[1]
    slot_pos = _per_query_head(pos, h)[:, :, None, :]                            # [B, H, 1, S]
    seen = (slot_pos >= 0) & (slot_pos <= window_pos[:, None, :, None])          # [B, H, w, S]
    p = _probs(q_window, keys, seen) * q_valid[:, None, :, None]
    return jnp.sum(p, axis=2)


def query_scores(q: jax.Array, query_pos: jax.Array, real: jax.Array, keys: jax.Array,
                 pos: jax.Array) -> jax.Array:
    """`[B, H, S]` H2O contributions of a segment chunk: q `[B, c, H, D]` at `query_pos [B, c]`, the
    `real [B, c]` ones summed; same softmax as `window_scores`."""
    return window_scores(q.transpose(0, 2, 1, 3), query_pos, real, keys, pos)


def seen_by(pos: jax.Array, query_pos: jax.Array, real: jax.Array) -> jax.Array:
    """`[B, K, S]` float32: how many of a chunk's real queries (`[B, c]`) see each slot."""
    sees = (pos[:, :, None, :] >= 0) & (pos[:, :, None, :] <= query_pos[:, None, :, None])
    return jnp.sum(sees & real[:, None, :, None], axis=2).astype(jnp.float32)


def select(method: Method, keys: jax.Array, pos: jax.Array, occupied: jax.Array, layer, num_layers: int, *,
           window_attention: jax.Array | None = None, query_scores: jax.Array | None = None,
           seen: jax.Array | None = None) -> jax.Array:
    """Kept slots of a live layer: `[B, K, method.max_slots(num_layers)]` slot indices, ascending per
    (row, KV head), -1 holes last. keys `[B, K, S, D]`, pos `[B, K, S]`, `occupied [B]` the layer's
    next slot per row; `window_attention [B, H, S]` from `window_scores` for methods with an
    observation window; `query_scores [B, H, S]` and `seen [B, K, S]` (`seen_by` summed) for H2O."""
    if isinstance(method, H2O) and method.normalize:  # by the segment queries that saw each slot
        query_scores = query_scores / jnp.maximum(_per_query_head(seen, query_scores.shape[1]), 1.0)
        method = dataclasses.replace(method, normalize=False)
    inputs = LayerInputs(keys=keys, lengths=occupied, query_scores=query_scores,
                         window_attention=window_attention, valid=pos >= 0)
    return method.select(inputs, layer, num_layers, "xla")


def gather_slots(k: jax.Array, v: jax.Array, pos: jax.Array, idx: jax.Array):
    """k, v `[B, K, S, D]`, pos `[B, K, S]`, slot indices `[B, K, C]` (-1: a hole) -> the gathered
    `[B, K, C, D]` K/V (zeros at holes) and `[B, K, C]` positions (-1 at holes)."""
    safe = jnp.maximum(idx, 0)
    live = idx >= 0
    k = jnp.where(live[..., None], jnp.take_along_axis(k, safe[..., None], axis=2), 0).astype(k.dtype)
    v = jnp.where(live[..., None], jnp.take_along_axis(v, safe[..., None], axis=2), 0).astype(v.dtype)
    return k, v, jnp.where(live, jnp.take_along_axis(pos, safe, axis=2), -1)
