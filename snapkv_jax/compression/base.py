"""What every KV-cache compression method shares: the `Method` base, its layer inputs, and the pieces a
selection is built from (keep everything; top-k of the prefix plus the recent window; ascending order
with -1 holes last; gathering the kept slots' keys and values).

A method is a frozen, hashable dataclass (a static argument under jit) that answers, for layer l of an
L-layer model:

  * `threshold(l, L)`: rows with more prompt tokens than this are compressed in layer l; shorter rows are
    left untouched (slot i holds position i; DESIGN section 3, invariant 3).
  * `slots(l, L)`: the slots a compressed row occupies in layer l per KV head, holes included.
  * `select(inputs, layer, L, impl)`: the kept prompt positions `[B, K, max_slots(L)]`, ascending per (row,
    KV head), -1 holes last. `layer` may be traced, so one compiled program serves every layer; a layer
    whose `slots` is below `max_slots` leaves the tail as holes, which prefill cuts off.

`capacity` means the same everywhere: the slots a compressed prompt occupies per (layer, row, KV head),
sinks and recent window included; for per-layer (PyramidKV) or per-head (Ada-KV) budgets, their average.
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_NO_HOLE = jnp.iinfo(jnp.int32).max  # sorts holes last


class LayerInputs(NamedTuple):
    """One layer's prefill tensors, as a selection sees them.

    keys `[B, K, T, D]` after RoPE (or a `jax.ShapeDtypeStruct` of that shape when every score that
    reads keys is precomputed: a sequence-parallel prefill, where no device holds all of them); lengths
    `[B]` int32 real prompt lengths; q_window `[B, H, w, D]` the queries of positions L-w .. L-1 of each
    row (after RoPE, unscaled; None for methods that need none); query_scores float32 per-key scores
    computed during prefill: H2O's `[B, H, T]` attention each key received summed over every prompt query
    that sees it, KVzip's `[B, K, T]` reconstruction scores (None for the other methods);
    window_attention `[B, H, T]` float32, the observation-window scores (SnapKV step 2) when already
    computed across devices (sharding.py) or over a live cache (compression/live.py), else None and
    computed from `keys`; valid `[B, K, T]` bool, False at holes a selection must never pick (a live
    cache's empty slots), None when every position below `lengths` holds a key.
    """

    keys: jax.Array | jax.ShapeDtypeStruct
    lengths: jax.Array
    q_window: jax.Array | None = None
    query_scores: jax.Array | None = None
    window_attention: jax.Array | None = None
    valid: jax.Array | None = None


class Method:
    """Base of the compression methods. Subclasses are frozen dataclasses declaring `capacity` (and their
    own knobs) and implementing `select`; the defaults here describe a uniform budget of `capacity` slots
    in every layer and head."""

    name: ClassVar[str]
    needs_query_scores: ClassVar[bool] = False
    # False for a method that cannot re-select over a live cache (`extend(..., compress=)`).
    reselects_live: ClassVar[bool] = True
    # True when a KV head's selection reads only that head's inputs, so a device holding some KV heads
    # (sharding.py's `model` axis) can select them alone.
    per_head: ClassVar[bool] = True
    # True when the scores come from a reconstruction pass prefill runs for the method (KVzip).
    reconstructs: ClassVar[bool] = False
    capacity: int

    @property
    def observation_window(self) -> int:
        """Trailing prompt queries the selection looks at (0: none)."""
        return 0

    def threshold(self, layer: Any, num_layers: int) -> Any:
        return self.capacity

    def slots(self, layer: int, num_layers: int) -> int:
        return self.capacity

    def max_slots(self, num_layers: int) -> int:
        return max(self.slots(layer, num_layers) for layer in range(num_layers))

    def check_model(self, num_layers: int) -> None:
        """Raises ValueError when the method cannot run on a model of `num_layers` layers."""

    def check_tokens(self, vocab_size: int) -> None:
        """Raises ValueError when token ids the method feeds the model lie outside the vocabulary."""

    def positions(self, length: int) -> int:
        """RoPE positions a prompt of `length` real tokens uses while the method compresses it."""
        return length

    def select(self, inputs: LayerInputs, layer: Any, num_layers: int, impl: str) -> jax.Array:
        raise NotImplementedError

    def describe(self) -> str:
        """One line naming the method and its knobs, for reports."""
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{self.name}({fields})"


def check_int(owner: str, name: str, value, minimum: int) -> int:
    """`value` as an int if it is an integer (NumPy ones too, bools not) >= minimum, else ValueError."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{owner} {name} must be an integer, got {value!r}")
    if value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{owner} {name} must be {what}, got {value!r}")
    return int(value)


def check_choice(owner: str, name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {owner} {name} {value!r}; use one of {choices}")


def check_lengths(lengths: jax.Array, tokens: int) -> None:
    """Raises ValueError unless `lengths [B]` are integers and, where their values are known (not traced
    under the caller's jit), each in [1, tokens]: the selection helpers would otherwise truncate floats
    and return positions outside the keys."""
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")
    if isinstance(lengths, jax.core.Tracer):
        return
    values = jax.device_get(lengths)
    if (values < 1).any() or (values > tokens).any():
        raise ValueError(f"lengths must be in [1, {tokens}] (the keys' tokens), got {values.tolist()}")


def keep_all(lengths: jax.Array, kv_heads: int, width: int) -> jax.Array:
    """`[B, K, width]`: 0 .. L-1 then -1, the positions of an untouched row."""
    slots = jnp.arange(width, dtype=jnp.int32)
    pos = jnp.where(slots < lengths[:, None], slots, -1)                       # [B, width]
    return jnp.broadcast_to(pos[:, None, :], (lengths.shape[0], kv_heads, width))


def window_positions(lengths: jax.Array, kv_heads: int, window: int) -> jax.Array:
    """`[B, K, w]`: positions L-w .. L-1 of each row (the recent window every method keeps)."""
    pos = (lengths[:, None] - window + jnp.arange(window, dtype=jnp.int32))[:, None, :]
    return jnp.broadcast_to(pos, (lengths.shape[0], kv_heads, window)).astype(jnp.int32)


def prefix_mask(lengths: jax.Array, window: int, tokens: int, valid: jax.Array | None = None) -> jax.Array:
    """`[B, 1, T]` True at prefix positions j < L - w (`[B, K, T]`, and False at holes, given `valid`)."""
    mask = (jnp.arange(tokens) < (lengths - window)[:, None])[:, None, :]
    return mask if valid is None else mask & valid


def ascending(idx: jax.Array) -> jax.Array:
    """Sorts `[..., S]` positions ascending with the -1 holes last."""
    s = jnp.sort(jnp.where(idx < 0, _NO_HOLE, idx), axis=-1)
    return jnp.where(s == _NO_HOLE, -1, s)


def top_prefix(scores: jax.Array, k: int, budget: Any = None) -> jax.Array:
    """`[B, K, T]` scores (-inf outside the prefix) -> `[B, K, k]` positions of the k best, -1 where a
    rank is >= `budget` (a traced per-layer budget <= k) or the score is -inf (fewer candidates). Equal
    scores (common after max pooling) go to the earlier position: `lax.top_k` keeps the lower index first.
    kvpress's `torch.topk` promises no order among ties."""
    values, idx = lax.top_k(scores, k)
    keep = jnp.isfinite(values)
    if budget is not None:
        keep &= jnp.arange(k) < budget
    return jnp.where(keep, idx.astype(jnp.int32), -1)


def prefix_plus_window(prefix: jax.Array, lengths: jax.Array, window: int) -> jax.Array:
    """`[B, K, P]` kept prefix positions (-1 holes) and the window -> `[B, K, P + w]` ascending."""
    win = window_positions(lengths, prefix.shape[1], window)
    return ascending(jnp.concatenate([prefix, win], axis=-1))


def untouched_below(kept: jax.Array, lengths: jax.Array, threshold: Any) -> jax.Array:
    """Rows with L <= threshold get `keep_all` instead of `kept [B, K, S]` (S must be >= threshold)."""
    short = keep_all(lengths, kept.shape[1], kept.shape[2])
    return jnp.where((lengths > threshold)[:, None, None], kept, short)


def gather_kept(k: jax.Array, v: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gathers the kept slots: k, v `[B, K, T, D]`, idx `[B, K, C]` from `select` -> (k_kept, v_kept
    `[B, K, C, D]`, pos `[B, K, C]` int32 = idx). Slots with idx -1 get zeros and keep pos -1.

    Raises ValueError if k and v differ in shape or idx does not match their [B, K].
    """
    if k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"k and v must share one [B, K, T, D] shape, got {k.shape} and {v.shape}")
    if idx.ndim != 3 or idx.shape[:2] != k.shape[:2]:
        raise ValueError(f"idx must be [B, K, C] with [B, K] = {k.shape[:2]}, got {idx.shape}")
    idx = idx.astype(jnp.int32)
    safe = jnp.maximum(idx, 0)[..., None]                                       # [B, K, C, 1]
    live = (idx >= 0)[..., None]
    k_kept = jnp.where(live, jnp.take_along_axis(k, safe, axis=2), 0)           # [B, K, C, D]
    v_kept = jnp.where(live, jnp.take_along_axis(v, safe, axis=2), 0)
    return k_kept.astype(k.dtype), v_kept.astype(v.dtype), idx
