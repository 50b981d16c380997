"""RandomKV: a seeded uniform choice of `capacity - window` prefix positions plus the recent window.
It knows nothing about the prompt, so it is the floor every scoring method must beat.

Each (seed, layer, KV head, position) gets a pseudo-random 32-bit priority from an integer hash, and a
compressed row keeps the prefix positions of highest priority. Priorities depend on nothing else, so a
row's choice is the same alone or in any batch, at any padded width (DESIGN section 3, invariant 4), and
is uniform over the prefix's subsets of that size.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from snapkv_jax.compression.base import (LayerInputs, Method, check_int, keep_all, prefix_mask,
                                         prefix_plus_window, untouched_below)

# Multipliers of a 32-bit integer finaliser (xor-shift-multiply), and odd constants that separate the
# hashed fields.
_M1, _M2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)
_LAYER, _HEAD = np.uint32(0x9E3779B9), np.uint32(0x85EBCA6B)


def mix32(x):
    """A bijective avalanche of uint32 `x` (works on jnp and NumPy uint32 arrays alike)."""
    x = x ^ (x >> 16)
    x = x * _M1
    x = x ^ (x >> 15)
    x = x * _M2
    return x ^ (x >> 16)


def priorities(seed: int, layer, kv_heads: int, tokens: int) -> jax.Array:
    """`[K, T]` uint32 priority of each (KV head, position) in `layer` (traced or static)."""
    base = mix32(jnp.uint32(seed) ^ (jnp.asarray(layer).astype(jnp.uint32) * _LAYER))
    heads = mix32(base ^ (jnp.arange(kv_heads, dtype=jnp.uint32) * _HEAD))         # [K]
    return mix32(heads[:, None] ^ jnp.arange(tokens, dtype=jnp.uint32)[None, :])    # [K, T]


@dataclasses.dataclass(frozen=True)
class RandomKV(Method):
    """`capacity` slots: `capacity - window` random prefix positions and the last `window` positions."""

    name: ClassVar[str] = "random"
    per_head: ClassVar[bool] = False  # draws are indexed by the global KV head

    capacity: int = 1024
    window: int = 32
    seed: int = 0

    def __post_init__(self):
        for name, minimum in (("capacity", 1), ("window", 0), ("seed", 0)):
            object.__setattr__(self, name, check_int("RandomKV", name, getattr(self, name), minimum))
        if self.seed >= 2**32:
            raise ValueError(f"RandomKV seed must be below 2**32, got {self.seed}")
        if self.capacity <= self.window:
            raise ValueError(f"RandomKV capacity={self.capacity} must be greater than window={self.window}")

    def select(self, inputs: LayerInputs, layer, num_layers: int, impl: str) -> jax.Array:
        keys, lengths = inputs.keys, inputs.lengths
        b, kv_heads, t = keys.shape[:3]
        if t <= self.capacity:
            return keep_all(lengths, kv_heads, self.capacity)
        # Rank integers: float32 cannot order 32-bit priorities exactly. Flipping the sign bit maps the
        # unsigned order onto the signed one, and top_k takes int32.
        order = lax.bitcast_convert_type(priorities(self.seed, layer, kv_heads, t) ^ jnp.uint32(1 << 31),
                                         jnp.int32)                                 # [K, T]
        ranked = jnp.where(prefix_mask(lengths, self.window, t, inputs.valid), order[None],
                           jnp.iinfo(jnp.int32).min)
        ranked = jnp.broadcast_to(ranked, (b, kv_heads, t))
        _, idx = lax.top_k(ranked, self.capacity - self.window)
        kept = prefix_plus_window(idx.astype(jnp.int32), lengths, self.window)
        return untouched_below(kept, lengths, self.capacity)
