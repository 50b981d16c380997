"""H2O in its prefill form (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
Large Language Models", arXiv 2306.14048, section 4): a key's importance is the attention probability it
receives summed over every prompt query that sees it; the "heavy hitters" with the largest sums are kept,
with the most recent `window` positions.

    scores[b, h, j] = sum_{i = j .. L-1} softmax_i(q[b, h, i] . k[b, h // G, :] / sqrt(D))[j]

causal softmax per query in float32 (as SnapKV's), reduced over the G query heads of each KV head like
SnapKV (`gqa_reduce`), no pooling. `normalize=True` divides each key's sum by the L - j queries that see
it (kvpress's observed-attention variant). kvpress's `ObservedAttentionPress(compression_ratio=r)`
protects no recent window: it is `H2O(capacity=int(T * (1 - r)), window=0, normalize=True)`, kept sets
identical (experiments/kvpress_parity.py). The [T, T] probabilities are never materialised: prefill adds
each query chunk's contribution into one `[B, H, T]` accumulator, so memory is O(chunk x T) per layer.
On a GPU the contribution comes from a Pallas kernel that reuses the attention's own log-sum-exp per
query (pallas/h2o_scores_mosaic.py on Hopper and later, else pallas/h2o_scores_triton.py, as
pallas/dispatch.py picks); its `jnp` reference, `chunk_scores_reference`, is the CPU path. On a
sliding-window model the softmax still runs over every earlier key, as SnapKV's window scores do
(DESIGN section 4), not over the model's window.

Invariants: rows with L > capacity keep the top `capacity - window` prefix positions (j < L - w) by score
and the window L-w .. L-1, ascending; shorter rows are untouched.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from snapkv_jax.compression.base import (LayerInputs, Method, check_choice, check_int, keep_all,
                                         prefix_mask, prefix_plus_window, top_prefix, untouched_below)
from snapkv_jax.compression.scoring import reduce_gqa
from snapkv_jax.pallas.h2o_scores import chunk_scores_reference


def query_scores(queries: jax.Array, keys: jax.Array, lengths: jax.Array, chunk: int = 256) -> jax.Array:
    """`[B, H, T]` H2O scores of whole-prompt queries `[B, H, T, D]`, accumulated over query chunks of
    `chunk` positions (memory O(chunk x T))."""
    t = queries.shape[2]
    total = jnp.zeros((queries.shape[0], queries.shape[1], keys.shape[2]), jnp.float32)
    for start in range(0, t, chunk):
        total = total + chunk_scores_reference(queries[:, :, start:start + chunk], keys, lengths, start)
    return total


@dataclasses.dataclass(frozen=True)
class H2O(Method):
    """`capacity` slots: the `capacity - window` heaviest prefix keys and the last `window` positions."""

    name: ClassVar[str] = "h2o"
    needs_query_scores: ClassVar[bool] = True

    capacity: int = 1024
    window: int = 32
    normalize: bool = False
    gqa_reduce: str = "mean"

    def __post_init__(self):
        object.__setattr__(self, "capacity", check_int("H2O", "capacity", self.capacity, 1))
        object.__setattr__(self, "window", check_int("H2O", "window", self.window, 0))
        if self.capacity <= self.window:
            raise ValueError(f"H2O capacity={self.capacity} must be greater than window={self.window}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"H2O normalize must be True or False, got {self.normalize!r}")
        check_choice("H2O", "gqa_reduce", self.gqa_reduce, ("mean", "max"))

    def select(self, inputs: LayerInputs, layer, num_layers: int, impl: str) -> jax.Array:
        keys, lengths = inputs.keys, inputs.lengths
        kv_heads, t = keys.shape[1], keys.shape[2]
        if t <= self.capacity:
            return keep_all(lengths, kv_heads, self.capacity)
        scores = inputs.query_scores                                              # [B, H, T]
        if self.normalize:  # key j is seen by the L - j queries j .. L-1
            seen_by = jnp.maximum(lengths[:, None] - jnp.arange(t), 1).astype(jnp.float32)
            scores = scores / seen_by[:, None, :]
        reduced = reduce_gqa(scores, kv_heads, self.gqa_reduce)                   # [B, K, T]
        ranked = jnp.where(prefix_mask(lengths, self.window, t, inputs.valid), reduced, -jnp.inf)
        kept = prefix_plus_window(top_prefix(ranked, self.capacity - self.window), lengths, self.window)
        return untouched_below(kept, lengths, self.capacity)
