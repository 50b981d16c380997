"""Ada-KV (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference", arXiv 2407.11550): inside a layer, the KV heads share one budget, so a head whose
attention is concentrated gives slots to a head whose attention is spread. Scores are SnapKV's (pooled,
GQA-reduced window scores, `[B, K, T]`).

With p = capacity - window prefix slots per head on average, per row and layer:
  1. safeguard (the paper's alpha, applied as the authors' code does, to the prefix budget p): each KV
     head keeps its own top floor(alpha * p);
  2. the other K * (p - floor(alpha * p)) prefix slots of the layer go to one joint top-k over every
     head's remaining scores, no head exceeding `max_per_head` prefix slots (default 2p);
  3. every head keeps the window.
A head's kept positions come first, ascending, then -1 holes, in the layer's fixed width
`max_per_head + window`: the cache allocates that width but holds K * capacity positions per row.

kvpress's `AdaKVPress(SnapKVPress(compression_ratio=r, window_size=w), alpha_safeguard=a)` differs in two
knobs, both expressible here (experiments/kvpress_parity.py checks the kept sets are identical): it
counts its safeguard max(1, int(a * n)) with the window included (n = int(T * (1 - r)) = our capacity;
the window's scores are the highest, so its prefix floor is max(0, max(1, int(a * n)) - w), often 0), and
it caps no head. Its rule is `AdaKV(capacity=n, window=w, alpha=a', max_per_head=T - w)` with
int(a' * (n - w)) equal to that floor.

Invariants: per compressed row and layer, exactly K * (capacity - window) prefix positions over the
heads, each head between floor(alpha * p) and max_per_head; shorter rows (L <= capacity) untouched.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from snapkv_jax.compression.base import LayerInputs, Method, keep_all, prefix_plus_window
from snapkv_jax.compression.base import check_int, top_prefix, untouched_below
from snapkv_jax.compression.scoring import check_scoring_knobs, pooled_scores
from snapkv_jax.config import finite_real


@dataclasses.dataclass(frozen=True)
class AdaKV(Method):
    """Per-head budgets inside each layer averaging `capacity` slots per KV head; SnapKV scoring knobs."""

    name: ClassVar[str] = "adakv"
    per_head: ClassVar[bool] = False  # one joint top-k over the layer's KV heads

    capacity: int = 1024
    window: int = 32
    alpha: float = 0.2
    max_per_head: int | None = None
    kernel: int = 7
    pooling: str = "maxpool"
    gqa_reduce: str = "mean"

    def __post_init__(self):
        check_scoring_knobs(self, "AdaKV")
        alpha = self.alpha
        if not finite_real(alpha):
            raise ValueError(f"AdaKV alpha must be a number in [0, 1], got {alpha!r}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"AdaKV alpha={alpha!r} puts the per-head floor floor(alpha * p) above the "
                             f"per-head average p = capacity - window; use alpha in [0, 1]")
        object.__setattr__(self, "alpha", float(alpha))
        if self.max_per_head is not None:
            cap = check_int("AdaKV", "max_per_head", self.max_per_head, 1)
            if cap < self.prefix_budget:
                raise ValueError(f"AdaKV max_per_head={cap} is below the per-head average prefix budget "
                                 f"capacity - window = {self.prefix_budget}")
            object.__setattr__(self, "max_per_head", cap)

    @property
    def prefix_budget(self) -> int:
        return self.capacity - self.window

    @property
    def floor(self) -> int:
        return int(self.alpha * self.prefix_budget)

    @property
    def cap(self) -> int:
        return 2 * self.prefix_budget if self.max_per_head is None else self.max_per_head

    @property
    def observation_window(self) -> int:
        return self.window

    def slots(self, layer: int, num_layers: int) -> int:
        return self.cap + self.window

    def select(self, inputs: LayerInputs, layer, num_layers: int, impl: str) -> jax.Array:
        keys, lengths = inputs.keys, inputs.lengths
        b, kv_heads, t = keys.shape[:3]
        width = self.cap + self.window
        if t <= self.capacity:
            return keep_all(lengths, kv_heads, width)
        scores = pooled_scores(inputs.q_window, keys, lengths, window=self.window, kernel=self.kernel,
                               pooling=self.pooling, gqa_reduce=self.gqa_reduce, impl=impl,
                               precomputed=inputs.window_attention, valid=inputs.valid)  # [B, K, T]
        floor, extra = self.floor, self.cap - self.floor   # per head: guaranteed, most beyond that
        safe = top_prefix(scores, floor) if floor else jnp.zeros((b, kv_heads, 0), jnp.int32)
        rest = scores
        if floor:  # the safeguard's picks leave the joint competition
            # A -1 (a head with fewer valid prefix slots than the floor: a live cache's holes) must write
            # nowhere: sent to slot 0 it would collide with a real pick there, and the scatter could let
            # that slot back into the joint top-k, keeping it twice.
            taken = jnp.zeros((b, kv_heads, t), bool).at[
                jnp.arange(b)[:, None, None], jnp.arange(kv_heads)[None, :, None], jnp.where(safe >= 0, safe, t)].set(
                True, mode="drop")
            rest = jnp.where(taken, -jnp.inf, scores)
        # A head's candidates are its best `extra` remaining positions; the layer's joint top-k over all
        # candidates then equals greedy allocation with the per-head cap.
        cand_scores, cand_idx = lax.top_k(rest, min(extra, t))                    # [B, K, E]
        shared = kv_heads * (self.prefix_budget - floor)
        flat = cand_scores.reshape(b, -1)                                         # [B, K*E]
        top_vals, top_flat = lax.top_k(flat, shared)                              # [B, K*p - K*floor]
        chosen = jnp.zeros(flat.shape, bool).at[jnp.arange(b)[:, None], top_flat].set(jnp.isfinite(top_vals))
        joint = jnp.where(chosen.reshape(cand_idx.shape), cand_idx.astype(jnp.int32), -1)
        prefix = jnp.concatenate([safe, joint], axis=-1)                          # [B, K, floor + E]
        kept = prefix_plus_window(prefix, lengths, self.window)                   # ascending, holes last
        if kept.shape[2] < width:
            kept = jnp.pad(kept, ((0, 0), (0, 0), (0, width - kept.shape[2])), constant_values=-1)
        return untouched_below(kept, lengths, self.capacity)
