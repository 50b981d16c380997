"""The KV cache: an immutable pytree of per-layer arrays, and the pure functions that build and update it.

Layout (DESIGN section 3). One array per layer, never stacked: a decode step that `lax.scan`s over a
stacked `[layers, ...]` cache copies it every step (3.5-5.6x the HBM roofline on an H100), while an
unrolled loop over per-layer donated arrays runs at 1.07-1.19x. Per-layer arrays also allow per-layer
slot counts.

- `k[l]`, `v[l]`: `[B, K, S, D]` keys (after RoPE) and values of layer l.
- `pos[l]`: `[B, K, S]` int32 absolute position held in each slot, -1 for an empty slot.
- `end`: `[B]` int32 next slot to write, in every layer whose prompt occupies the most slots (all layers
  unless a method gives layers different widths, as PyramidKV does).
- `next_pos`: `[B]` int32 RoPE position of the next token.
- `lengths`: `[B]` int32 prompt lengths; `prompt_slots`: static, per layer, the slots W_l its prompt
  region spans. Row b's prompt holds min(L_b, W_l) slots of layer l (kept positions, then holes for
  per-head budgets), so layer l's next slot is end[b] - (min(L_b, max W) - min(L_b, W_l)) (`write_slots`).
- `offsets`: None after prefill (the formula above), or `[L, B]` int32 set by `extend`, whose
  re-compression can leave each (layer, row) with its own next slot: layer l's is end[b] - offsets[l, b].
- `on_context`: static; True for the rows' own slots after a shared context (`extend(..., context=)`),
  whose lowest position is the context's next position. Such a cache is used with that context only.
- `context_mark`: None, or for rows on a context `[B]` uint32, that context's fingerprint
  (`generate.context_fingerprint`), so rows handed another context of the same length are refused.

Invariants: attention reads only slots with `pos >= 0`; slots at or past a layer's next slot hold -1;
after a compressed prefill `next_pos[b]` is the original prompt length, not the compressed one. Below a
layer's next slot, positions ascend in slot order (holes aside), so slot order is position order.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.layout import Layout, with_layout_constraint

from snapkv_jax.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]    # per layer [B, K, S, D]
    v: tuple[jax.Array, ...]    # per layer [B, K, S, D]
    pos: tuple[jax.Array, ...]  # per layer [B, K, S] int32, -1 = empty
    end: jax.Array              # [B] int32
    next_pos: jax.Array         # [B] int32
    lengths: jax.Array          # [B] int32 prompt lengths
    prompt_slots: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    offsets: jax.Array | None = None  # [L, B] int32, or None: derived from lengths and prompt_slots
    # True for rows' own slots after a shared context (started by `extend(..., None, context=)`): their
    # positions continue that context's, and they are only ever used with it
    on_context: bool = flax.struct.field(pytree_node=False, default=False)
    context_mark: jax.Array | None = None  # [B] uint32: the fingerprint of that context, rows on one only

    @property
    def batch(self) -> int:
        return self.end.shape[0]

    @property
    def slots(self) -> int:
        """Slots per (layer, row, KV head) of layer 0 (all layers share it unless built otherwise)."""
        return self.k[0].shape[2]

    @property
    def num_layers(self) -> int:
        return len(self.k)


def write_slots(cache: KVCache, layer: int) -> jax.Array:
    """`[B]` the slot layer `layer` writes the next token to."""
    if cache.offsets is not None:
        return cache.end - cache.offsets[layer]
    widest = max(cache.prompt_slots, default=0)
    if not cache.prompt_slots or cache.prompt_slots[layer] == widest:
        return cache.end
    narrower = jnp.minimum(cache.lengths, widest) - jnp.minimum(cache.lengths, cache.prompt_slots[layer])
    return cache.end - narrower


def all_write_slots(cache: KVCache) -> jax.Array:
    """`[L, B]` the next slot of every layer and row (`write_slots` of each layer, stacked)."""
    return jnp.stack([write_slots(cache, layer) for layer in range(cache.num_layers)])


def host_write_slots(cache: KVCache, fetched=None) -> np.ndarray:
    """`all_write_slots` computed on the host from one transfer: `[L, B]` int NumPy array. `fetched`:
    the host values of (cache.end, cache.lengths, cache.offsets), when the caller's transfer brought them."""
    fetched = jax.device_get((cache.end, cache.lengths, cache.offsets)) if fetched is None else fetched
    end, lengths, offsets = (np.asarray(a) for a in fetched)
    if cache.offsets is not None:
        return end[None, :] - offsets
    widest = max(cache.prompt_slots, default=0)
    rows = [end if not cache.prompt_slots or w == widest
            else end - (np.minimum(lengths, widest) - np.minimum(lengths, w)) for w in
            (cache.prompt_slots or (0,) * cache.num_layers)]
    return np.stack(rows)


def with_write_slots(cache: KVCache, writes: jax.Array) -> KVCache:
    """The cache whose layer l writes next at `writes[l] [B]`: `end` becomes the largest of them and
    `offsets` each layer's distance below it."""
    end, offsets = write_state(writes)
    return cache.replace(end=end, offsets=offsets)


def write_state(writes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(end `[B]`, offsets `[L, B]`) of next slots `writes [L, B]`."""
    end = jnp.max(writes, axis=0)
    return end, end[None, :] - writes


def take_rows(cache: KVCache, rows) -> KVCache:
    """The cache of rows `rows` (indices into the batch, in that order; repeats copy a row)."""
    rows = jnp.asarray(rows, jnp.int32)
    pick = lambda a: jnp.take(a, rows, axis=0)
    return cache.replace(k=tuple(map(pick, cache.k)), v=tuple(map(pick, cache.v)), pos=tuple(map(pick, cache.pos)),
                         end=pick(cache.end), next_pos=pick(cache.next_pos), lengths=pick(cache.lengths),
                         offsets=None if cache.offsets is None else jnp.take(cache.offsets, rows, axis=1),
                         context_mark=None if cache.context_mark is None else pick(cache.context_mark))


def widen(cache: KVCache, extra: int) -> KVCache:
    """Every layer with `extra` more empty slots at its end (a new cache; the old one is unchanged)."""
    if extra <= 0:
        return cache
    layers = [pad_slots(k, v, p, k.shape[2] + extra) for k, v, p in zip(cache.k, cache.v, cache.pos)]
    return cache.replace(k=tuple(k for k, _, _ in layers), v=tuple(v for _, v, _ in layers),
                         pos=tuple(p for _, _, p in layers))


def create(cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
    """An empty cache: every slot -1, `end` and `next_pos` 0. `decode_step` can start from it, feeding a
    prompt one token at a time (`dtype` should match the params'). Built by one compiled program (3
    arrays per layer made one by one cost a host dispatch each)."""
    return _create(cfg=cfg, batch=batch, slots=slots, dtype=jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("cfg", "batch", "slots", "dtype"))
def _create(*, cfg: ModelConfig, batch: int, slots: int, dtype) -> KVCache:
    shape = (batch, cfg.num_kv_heads, slots, cfg.head_dim)
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
        pos=tuple(jnp.full(shape[:3], -1, jnp.int32) for _ in range(cfg.num_layers)),
        end=jnp.zeros((batch,), jnp.int32),
        next_pos=jnp.zeros((batch,), jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        prompt_slots=(0,) * cfg.num_layers,
    )


def pad_slots(k: jax.Array, v: jax.Array, pos: jax.Array, slots: int):
    """Widens one layer's `[B, K, n, D]` K/V and `[B, K, n]` positions to `slots` with empty slots."""
    extra = slots - k.shape[2]
    if extra < 0:
        raise ValueError(f"{k.shape[2]} prompt slots do not fit a cache of {slots} slots")
    if extra == 0:  # already that wide: no copy
        return k, v, pos
    k = jnp.pad(k, ((0, 0), (0, 0), (0, extra), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, extra), (0, 0)))
    pos = jnp.pad(pos, ((0, 0), (0, 0), (0, extra)), constant_values=-1)
    return k, v, pos


def fit_slots(k: jax.Array, v: jax.Array, pos: jax.Array, slots: int):
    """One layer's K/V and positions at exactly `slots` slots: widened with empty slots, or cut (callers
    cut only empty slots)."""
    if k.shape[2] >= slots:
        return k[:, :, :slots], v[:, :, :slots], pos[:, :, :slots]
    return pad_slots(k, v, pos, slots)


def prompt_positions(lengths: jax.Array, num_kv_heads: int, width: int) -> jax.Array:
    """`[B, K, width]` positions of an uncompressed prompt: slot i holds i for i < lengths[b], else -1."""
    i = jnp.arange(width, dtype=jnp.int32)                       # [T]
    pos = jnp.where(i[None, :] < lengths[:, None], i[None, :], -1)  # [B, T]
    return jnp.broadcast_to(pos[:, None, :], (lengths.shape[0], num_kv_heads, width))


def append_layer(k_cache: jax.Array, v_cache: jax.Array, pos_cache: jax.Array, k_new: jax.Array,
                 v_new: jax.Array, end: jax.Array, position: jax.Array):
    """Writes one token per row into slot `end[b]` of one layer; returns the three new arrays.

    k_cache/v_cache `[B, K, S, D]`, pos_cache `[B, K, S]`, k_new/v_new `[B, K, D]`, end/position `[B]`.
    An `end[b] >= S` write is dropped (callers check for a full cache before jit).
    """
    rows = jnp.arange(k_cache.shape[0])
    k_cache = k_cache.at[rows, :, end].set(k_new.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[rows, :, end].set(v_new.astype(v_cache.dtype), mode="drop")
    pos_new = jnp.broadcast_to(position[:, None], pos_cache.shape[:2]).astype(jnp.int32)
    pos_cache = pos_cache.at[rows, :, end].set(pos_new, mode="drop")
    return k_cache, v_cache, pos_cache


def write_segment(k_cache: jax.Array, v_cache: jax.Array, pos_cache: jax.Array, k_new: jax.Array,
                  v_new: jax.Array, slots: jax.Array, positions: jax.Array, *, from_front: bool = False):
    """Writes c tokens per row into one layer: k_new/v_new `[B, c, K, D]` into `slots [B, c]` at
    `positions [B, c]`; returns the three new arrays. Writes to a slot >= S are dropped (`extend` sends
    a segment's padding there). `from_front`: the layer is empty and each row's real tokens go to slots
    0, 1, ... (a question's first segment on a shared context); then one update of the front c slots,
    padding written as empty slots, makes the same arrays as the scatter in fewer and cheaper kernels."""
    s = k_cache.shape[2]
    if from_front and k_new.shape[1] <= s:
        real = (slots < s)[:, None, :]                                           # [B, 1, c]
        k = jnp.where(real[..., None], k_new.transpose(0, 2, 1, 3), 0).astype(k_cache.dtype)
        v = jnp.where(real[..., None], v_new.transpose(0, 2, 1, 3), 0).astype(v_cache.dtype)
        pos = jnp.broadcast_to(jnp.where(real, positions[:, None, :], -1), k.shape[:3]).astype(jnp.int32)
        return (lax.dynamic_update_slice(k_cache, k, (0, 0, 0, 0)), lax.dynamic_update_slice(v_cache, v, (0, 0, 0, 0)),
                lax.dynamic_update_slice(pos_cache, pos, (0, 0, 0)))
    rows = jnp.arange(k_cache.shape[0])[:, None]                                 # [B, 1]
    k_cache = k_cache.at[rows, :, slots].set(k_new.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[rows, :, slots].set(v_new.astype(v_cache.dtype), mode="drop")
    pos_new = jnp.broadcast_to(positions[:, :, None], slots.shape + pos_cache.shape[1:2]).astype(jnp.int32)
    pos_cache = pos_cache.at[rows, :, slots].set(pos_new, mode="drop")
    return k_cache, v_cache, pos_cache


def advance(cache: KVCache, active: jax.Array | None = None) -> KVCache:
    """Moves `end` and `next_pos` one token on, after every layer has appended (only the `active [B]`
    rows, when given)."""
    step = 1 if active is None else active.astype(jnp.int32)
    return cache.replace(end=cache.end + step, next_pos=cache.next_pos + step)


def row_major(cache: KVCache) -> KVCache:
    """`cache` with every layer's k, v and pos pinned to the row-major layout: for the carry of a compiled
    decode loop. Unpinned, XLA may lay the carry out otherwise and copy the whole cache into and out of
    the loop: with 64 rows decoding over a shared context (H200, jax 0.11.2) it gave the keys a heads-major
    layout, a 2.03 GiB temporary (the keys of every layer) and a 4% slower step."""
    def pin(x):
        return with_layout_constraint(x, Layout(tuple(range(x.ndim))))
    return cache.replace(k=tuple(map(pin, cache.k)), v=tuple(map(pin, cache.v)), pos=tuple(map(pin, cache.pos)))


def unaliased(cache: KVCache, *kept: KVCache | None) -> KVCache:
    """`cache` with every array it shares with a `kept` cache replaced by a copy: for a cache about to be
    donated to a compiled loop. A jitted program returns an input it leaves unchanged as that same array
    (extend passes `lengths` through), and donating it would delete the caller's cache on a GPU: the
    caller's cache must stay usable (continuing one state twice, asking a context more questions)."""
    held = {id(x) for c in kept if c is not None for x in jax.tree.leaves(c)}
    return jax.tree.map(lambda x: jnp.copy(x) if id(x) in held else x, cache)


def valid_slots(cache: KVCache) -> jax.Array:
    """`[L, B, K]` number of occupied slots per layer, row and KV head."""
    return jnp.stack([(p >= 0).sum(-1) for p in cache.pos])


def held_bytes(cache: KVCache) -> int:
    """Bytes of K/V in slots that hold a position (what the cache stores), summed over layers and rows."""
    return sum(int((p >= 0).sum()) * 2 * k.shape[3] * k.dtype.itemsize for k, p in zip(cache.k, cache.pos))


def allocated_bytes(cache: KVCache) -> int:
    """Bytes of the K/V arrays (every slot, empty or not) and the position arrays."""
    return sum(k.nbytes + v.nbytes + p.nbytes for k, v, p in zip(cache.k, cache.v, cache.pos))
