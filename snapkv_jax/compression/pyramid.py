"""PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", arXiv 2406.02069): lower layers attend broadly and upper layers narrowly, so the prefix budget
shrinks linearly with depth, SnapKV's scoring choosing the positions inside each layer.

Budget schedule, as in the authors' code (KVCache-Factory): with p = capacity - window,
    min_p = p // beta,  max_p = 2p - min_p,  step = (max_p - min_p) // (L - 1),
layer l of L keeps max_p - l * step prefix positions plus the window, in `slots(l) = max_p - l*step + w`
slots, so the per-layer cache arrays differ in width and their average is about `capacity`.

Unlike KVCache-Factory, which skips compression for prompts shorter than `capacity` and reshapes the
schedule for prompts shorter than max_p + window, a row here is compressed in layer l exactly when it is
longer than that layer's slots; shorter rows are untouched in that layer.

kvpress's `PyramidKVPress` has another schedule, which no setting here reproduces: with P = T * (1 - r)
(a float), it lays the pyramid over whole layers, window included: layer l keeps round(max - l * s)
slots, max = 2P - P / beta, s = (max - P / beta) / (L - 1) (max clamped to T - w, and uniform SnapKV
with round(P) slots when P / beta < w), where ours keeps max_p - l * step prefix slots plus the window.
Inside a layer both keep the window and the top prefix positions by SnapKV's scores: given kvpress's
per-layer budget, `SnapKV(capacity=that budget)` keeps its sets (experiments/kvpress_parity.py).
Invariants: every layer keeps at least one prefix position (checked against the model before tracing).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from snapkv_jax.compression.base import LayerInputs, Method, check_int, keep_all, prefix_plus_window
from snapkv_jax.compression.base import top_prefix, untouched_below
from snapkv_jax.compression.scoring import check_scoring_knobs, pooled_scores


@dataclasses.dataclass(frozen=True)
class PyramidKV(Method):
    """Per-layer budgets averaging `capacity` slots, largest at layer 0; SnapKV knobs for the scoring."""

    name: ClassVar[str] = "pyramidkv"

    capacity: int = 1024
    window: int = 32
    beta: int = 20
    kernel: int = 7
    pooling: str = "maxpool"
    gqa_reduce: str = "mean"

    def __post_init__(self):
        check_scoring_knobs(self, "PyramidKV")
        object.__setattr__(self, "beta", check_int("PyramidKV", "beta", self.beta, 1))

    @property
    def observation_window(self) -> int:
        return self.window

    def schedule(self, num_layers: int) -> tuple[int, int]:
        """(max_p, step): layer l keeps max_p - l * step prefix positions."""
        p = self.capacity - self.window
        if num_layers == 1:
            return p, 0
        min_p = p // self.beta
        max_p = 2 * p - min_p
        return max_p, (max_p - min_p) // (num_layers - 1)

    def budget(self, layer, num_layers: int):
        max_p, step = self.schedule(num_layers)
        return max_p - layer * step

    def threshold(self, layer, num_layers: int):
        return self.budget(layer, num_layers) + self.window

    def slots(self, layer: int, num_layers: int) -> int:
        return self.budget(layer, num_layers) + self.window

    def check_model(self, num_layers: int) -> None:
        top = self.budget(num_layers - 1, num_layers)
        if top < 1:
            raise ValueError(
                f"PyramidKV(capacity={self.capacity}, window={self.window}, beta={self.beta}) leaves the top "
                f"layer ({num_layers - 1} of {num_layers}) {top} prefix positions; raise capacity or beta")

    def select(self, inputs: LayerInputs, layer, num_layers: int, impl: str) -> jax.Array:
        keys, lengths = inputs.keys, inputs.lengths
        kv_heads, t = keys.shape[1], keys.shape[2]
        widest = self.max_slots(num_layers)
        if t <= self.slots(num_layers - 1, num_layers):  # static: no row is compressed in any layer
            return keep_all(lengths, kv_heads, widest)
        scores = pooled_scores(inputs.q_window, keys, lengths, window=self.window, kernel=self.kernel,
                               pooling=self.pooling, gqa_reduce=self.gqa_reduce, impl=impl,
                               precomputed=inputs.window_attention, valid=inputs.valid)
        budget = self.budget(jnp.asarray(layer), num_layers)
        prefix = top_prefix(scores, min(widest - self.window, t), budget)      # [B, K, max_p], holes
        kept = prefix_plus_window(prefix, lengths, self.window)
        if kept.shape[2] < widest:  # t < max_p: pad to the one width every layer's program returns
            kept = jnp.pad(kept, ((0, 0), (0, 0), (0, widest - kept.shape[2])), constant_values=-1)
        return untouched_below(kept, lengths, budget + self.window)
