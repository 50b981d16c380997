"""Decode-time compression: keeping each row's cache bounded while it generates
(`generate(..., decode_compress=method, interval=N)`).

SnapKV compresses the prompt once; a long answer grows the cache again. Here, inside the jitted decode
loop, whenever a row has appended `interval` tokens since its last selection, every layer re-selects the
method's `capacity` slots over its live cache (compression/live.py, in slot space), so a layer never holds
more than max(prompt slots, capacity) + interval slots and shapes stay static. What each method looks at:
  * SnapKV (and PyramidKV, Ada-KV): the queries of the last `window` generated tokens, kept per layer in a
    ring buffer in the loop state, attend to the live slots at or before their positions; pooling runs
    over slot order (SnapKV, arXiv 2404.14469, applied to the generation so far).
  * H2O (Zhang et al., arXiv 2306.14048, section 4: eviction during generation): each slot accumulates
    the attention probability every generated token's query gave it (the model's own float32 decode
    softmax); the heavy hitters and the `window` most recent slots are kept, and the accumulated scores
    move with their slots. `normalize` divides by the number of generated steps the slot was held for
    (on a sliding-window model that includes steps whose window had passed it, which gave it 0: a slot
    no later query can reach ranks ever lower, where dividing by its visible steps would keep its old
    average).
  * StreamingLLM: the sinks and the most recent slots.
Invariants: rows re-select independently (a row's choice depends on its own state only); a row whose
layer holds no more than the method's threshold is untouched; kept slots keep their positions.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from snapkv_jax import cache as kv
from snapkv_jax.compression import Method, live
from snapkv_jax.config import ModelConfig


@flax.struct.dataclass
class State:
    """What the decode loop carries for decode-time compression.

    ring_q: per layer `[B, H, w, D]` queries of the last w generated tokens (w = the method's observation
    window, 0 when it has none); ring_pos `[B, w]` their positions (-1: not yet filled); scores / seen:
    per layer `[B, H, S]` accumulated attention and `[B, K, S]` steps that saw each slot (H2O only, else
    empty tuples); since `[B]` tokens appended since the last selection; count `[B]` tokens observed."""

    ring_q: tuple[jax.Array, ...]
    ring_pos: jax.Array
    scores: tuple[jax.Array, ...]
    seen: tuple[jax.Array, ...]
    since: jax.Array
    count: jax.Array


def with_offsets(cache: kv.KVCache) -> kv.KVCache:
    """The cache with explicit per-layer `offsets`, the pytree structure `reselect` returns (a loop carry
    must keep one structure)."""
    return cache if cache.offsets is not None else kv.with_write_slots(cache, kv.all_write_slots(cache))


def init(cfg: ModelConfig, cache: kv.KVCache, method: Method, dtype) -> State:
    """The empty state for `cache` (straight after prefill or extend)."""
    b, w = cache.batch, method.observation_window
    h2o = method.needs_query_scores
    return State(
        ring_q=tuple(jnp.zeros((b, cfg.num_heads, w, cfg.head_dim), dtype) for _ in range(cfg.num_layers)),
        ring_pos=jnp.full((b, w), -1, jnp.int32),
        scores=tuple(jnp.zeros((b, cfg.num_heads, k.shape[2]), jnp.float32) for k in cache.k) if h2o else (),
        seen=tuple(jnp.zeros(p.shape, jnp.float32) for p in cache.pos) if h2o else (),
        since=jnp.zeros((b,), jnp.int32), count=jnp.zeros((b,), jnp.int32))


def observe(state: State, observed, cache: kv.KVCache, position: jax.Array, active: jax.Array) -> State:
    """Folds one decode step into the state: `observed` per layer (q `[B, H, D]`, probs `[B, H, S]`) of
    the tokens at `position [B]`; only `active [B]` rows count. `cache` is the cache after the step."""
    rows = jnp.arange(position.shape[0])
    ring_q, ring_pos = state.ring_q, state.ring_pos
    if ring_pos.shape[1]:
        slot = jnp.where(active, state.count % ring_pos.shape[1], ring_pos.shape[1])  # inactive: dropped
        ring_q = tuple(r.at[rows, :, slot].set(q.astype(r.dtype), mode="drop") for r, (q, _) in zip(ring_q, observed))
        ring_pos = ring_pos.at[rows, slot].set(position, mode="drop")
    scores, seen = state.scores, state.seen
    if scores:
        on = active[:, None, None]
        scores = tuple(s + jnp.where(on, p, 0.0) for s, (_, p) in zip(scores, observed))
        seen = tuple(n + (on & (pos >= 0)) for n, pos in zip(seen, cache.pos))
    step = active.astype(jnp.int32)
    return state.replace(ring_q=ring_q, ring_pos=ring_pos, scores=scores, seen=seen,
                         since=state.since + step, count=state.count + step)


def reselect(cfg: ModelConfig, cache: kv.KVCache, state: State, method: Method, interval: int):
    """Re-selects every layer of the rows that have appended `interval` tokens since their last selection;
    returns (cache, state). A no-op (skipped by `lax.cond`) while no row is due."""
    due = state.since >= interval                                                 # [B]

    def run(args):
        cache, state = args
        ks, vs, ps, scores, seen, writes = [], [], [], [], [], []
        for layer in range(cfg.num_layers):
            k, v, pos = cache.k[layer], cache.v[layer], cache.pos[layer]
            occupied = kv.write_slots(cache, layer)
            window_attention = None
            if state.ring_pos.shape[1]:
                window_attention = live.window_scores(state.ring_q[layer], state.ring_pos, state.ring_pos >= 0,
                                                      k, pos)
            acc = state.scores[layer] if state.scores else None
            idx = live.select(method, k, pos, occupied, layer, cfg.num_layers, window_attention=window_attention,
                              query_scores=acc, seen=state.seen[layer] if state.seen else None)
            idx = idx[:, :, :k.shape[2]]                           # the tail past a layer's slots is holes
            nk, nv, npos = kv.pad_slots(*live.gather_slots(k, v, pos, idx), k.shape[2])
            pick = due[:, None, None]
            ks.append(jnp.where(pick[..., None], nk, k)), vs.append(jnp.where(pick[..., None], nv, v))
            ps.append(jnp.where(pick, npos, pos))
            if state.scores:
                moved = _gather_scores(acc, idx, k.shape[2])
                scores.append(jnp.where(pick, moved, acc))
                seen.append(jnp.where(pick, _gather_scores(state.seen[layer], idx, k.shape[2]), state.seen[layer]))
            squeezed = occupied > method.threshold(layer, cfg.num_layers)
            writes.append(jnp.where(due & squeezed, method.slots(layer, cfg.num_layers), occupied))
        cache = kv.with_write_slots(cache.replace(k=tuple(ks), v=tuple(vs), pos=tuple(ps)), jnp.stack(writes))
        state = state.replace(scores=tuple(scores), seen=tuple(seen), since=jnp.where(due, 0, state.since))
        return cache, state

    return jax.lax.cond(jnp.any(due), run, lambda args: args, (cache, state))


def _gather_scores(scores: jax.Array, idx: jax.Array, width: int) -> jax.Array:
    """Per-slot values `[B, N, S]` (N query or KV heads) moved to the kept slots `idx [B, K, C]`
    (zeros at holes), padded to `width`."""
    heads = scores.shape[1]
    per = jnp.repeat(idx, heads // idx.shape[1], axis=1)                           # [B, N, C]
    moved = jnp.where(per >= 0, jnp.take_along_axis(scores, jnp.maximum(per, 0), axis=2), 0.0)
    return jnp.pad(moved, ((0, 0), (0, 0), (0, width - moved.shape[2])))


def slots_needed(cfg: ModelConfig, prompt_widths, method: Method, interval: int) -> int:
    """Empty slots every layer needs after its prompt region: enough for `interval` tokens on top of
    whichever is larger, the prompt's slots or the method's."""
    return max(max(0, method.slots(layer, cfg.num_layers) - w) for layer, w in enumerate(prompt_widths)) + interval
