"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv
2309.17453): keep the first `sinks` positions, which absorb attention whatever they hold (the paper's
"attention sinks", section 3.1), and the most recent `capacity - sinks` positions. No scores at all.

Invariants: rows with L > capacity keep 0 .. sinks-1 and L-(capacity-sinks) .. L-1, ascending;
shorter rows are untouched. kvpress's `StreamingLLMPress(compression_ratio=r, n_sink=s)` is
`StreamingLLM(capacity=int(T * (1 - r)), sinks=s)` (experiments/kvpress_parity.py).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from snapkv_jax.compression.base import LayerInputs, Method, check_int, keep_all, untouched_below


@dataclasses.dataclass(frozen=True)
class StreamingLLM(Method):
    """`capacity` slots per (layer, row, KV head): `sinks` attention sinks plus the recent positions."""

    name: ClassVar[str] = "streamingllm"

    capacity: int = 1024
    sinks: int = 4

    def __post_init__(self):
        object.__setattr__(self, "capacity", check_int("StreamingLLM", "capacity", self.capacity, 1))
        object.__setattr__(self, "sinks", check_int("StreamingLLM", "sinks", self.sinks, 0))
        if self.capacity <= self.sinks:
            raise ValueError(f"StreamingLLM capacity={self.capacity} must be greater than sinks={self.sinks}")

    def select(self, inputs: LayerInputs, layer, num_layers: int, impl: str) -> jax.Array:
        keys, lengths = inputs.keys, inputs.lengths
        b, kv_heads = keys.shape[0], keys.shape[1]
        if keys.shape[2] <= self.capacity:
            return keep_all(lengths, kv_heads, self.capacity)
        recent = self.capacity - self.sinks
        sinks = jnp.broadcast_to(jnp.arange(self.sinks, dtype=jnp.int32), (b, self.sinks))
        tail = lengths[:, None] - recent + jnp.arange(recent, dtype=jnp.int32)       # [B, C - sinks]
        kept = jnp.concatenate([sinks, tail.astype(jnp.int32)], axis=-1)            # [B, C] ascending
        kept = jnp.broadcast_to(kept[:, None, :], (b, kv_heads, self.capacity))
        return untouched_below(kept, lengths, self.capacity)
