"""SnapKV: which prompt positions each KV head keeps after prefill: the `SnapKV` method (alias
`SnapKVConfig`), its per-layer selection, and `select`, the same from a layer's window queries and keys.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469, section 4
(Algorithm / Listing 1). Per layer, for row b with L = lengths[b], window w, capacity C, pooling kernel k:

  1. L <= C: keep every position 0 .. L-1 (the row is untouched).
  2. Else score the prefix: the last w prompt queries (the "observation window", after RoPE, scaled by
     1/sqrt(D)) attend causally to the L keys; softmax over keys in float32; sum the probabilities over
     the w queries, for prefix positions j < L - w (`window_scores`, a Pallas kernel on GPU).
  3. Pool each query head's scores along positions over the prefix only (positions >= L - w are padding):
     "avgpool" = torch avg_pool1d(k, stride 1, padding k//2, count_include_pad) (zero padding, divide by
     k), "maxpool" = max_pool1d with padding that never wins, or "none" (section 4.2: pooling keeps the
     neighbours of a selected position, so retrieved facts stay whole).
  4. GQA: reduce the pooled scores of the G = H // K query heads of each KV group ("mean" as in kvpress,
     or "max"), so the selection is per KV head and K/V are never repeated per query head.
  5. Keep the top C - w prefix positions per KV head plus the w window positions: C slots, ascending
     (equal scores go to the earlier position: `base.top_prefix`).

kvpress's `SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5)` is `SnapKV(capacity=
int(T * (1 - r)), window=64, kernel=5, pooling="avgpool")` (it averages over the window's queries
where step 2 sums them: the same order); experiments/kvpress_parity.py finds the kept sets identical.

Sliding-window models (Mistral with `sliding_window` W): scoring follows the paper's full causal window
attention and ignores W, as Listing 1 does. Decoding then sees only slots with position > query - W, so with
L - W > C - w some kept prefix slots are never attended again: they hold capacity, not wrong answers.

Invariants of `select` (tests/test_snapkv_select.py checks them against a float64 per-head oracle):
  * output `[B, K, C]` int32, ascending in each (row, KV head) for rows with L > C;
  * rows with L > C: C unique positions < L, including all of L-w .. L-1; padding (>= L) never selected;
  * rows with L <= C: 0 .. L-1 then -1;
  * a row's result depends only on that row's inputs;
  * validation looks at static shapes only, so `select` runs inside a caller's jit on traced arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp

from snapkv_jax.compression.base import LayerInputs, Method, keep_all, prefix_plus_window, top_prefix
from snapkv_jax.compression.base import check_lengths, untouched_below
from snapkv_jax.compression.scoring import check_scoring_knobs, pooled_scores, resolve_impl

Pooling = Literal["maxpool", "avgpool", "none"]
GqaReduce = Literal["mean", "max"]

__all__ = ["SnapKV", "SnapKVConfig", "select", "select_layer"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SnapKV(Method):
    """SnapKV knobs (arXiv 2404.14469, section 4): observation `window` w, total `capacity` C slots per
    (layer, row, KV head), pooling `kernel` size k, `pooling` mode and the GQA reduction.

    Defaults w=32, C=1024, k=7, maxpool follow the LongBench configurations of the SnapKV code.
    TOVA-style last-token scoring (Oren et al., arXiv 2401.06104) is `SnapKV(window=1, pooling="none")`:
    the last prompt query's attention alone ranks the prefix. The knobs are keyword-only: the other
    methods take `capacity` first, while `SnapKVConfig` (the same class) had `window` first, so a
    positional `SnapKV(64)` would mean one thing here and another there; it is refused instead.
    Invariants: capacity > window >= 1; kernel odd and >= 1.
    """

    name: ClassVar[str] = "snapkv"

    window: int = 32
    capacity: int = 1024
    kernel: int = 7
    pooling: Pooling = "maxpool"
    gqa_reduce: GqaReduce = "mean"

    def __post_init__(self):
        check_scoring_knobs(self, "SnapKV")

    @property
    def prefix_budget(self) -> int:
        """Prefix positions kept per KV head besides the window: C - w."""
        return self.capacity - self.window

    @property
    def observation_window(self) -> int:
        return self.window

    def select(self, inputs: LayerInputs, layer, num_layers: int, impl: str) -> jax.Array:
        return select_layer(self, inputs, impl)


SnapKVConfig = SnapKV  # the name before SnapKV joined the compression methods; the same class


def select_layer(snap: SnapKV, inputs: LayerInputs, impl: str) -> jax.Array:
    """SnapKV's selection for one layer (steps 1-5): `[B, K, C]`, traceable. `impl` is resolved."""
    keys, lengths = inputs.keys, inputs.lengths
    kv_heads, t = keys.shape[1], keys.shape[2]
    if t <= snap.capacity:  # static: no row can exceed the capacity
        return keep_all(lengths, kv_heads, snap.capacity)
    scores = pooled_scores(inputs.q_window, keys, lengths, window=snap.window, kernel=snap.kernel,
                           pooling=snap.pooling, gqa_reduce=snap.gqa_reduce, impl=impl,
                           precomputed=inputs.window_attention, valid=inputs.valid)
    kept = prefix_plus_window(top_prefix(scores, snap.prefix_budget), lengths, snap.window)
    return untouched_below(kept, lengths, snap.capacity)


@functools.partial(jax.jit, static_argnames=("snap", "impl"))
def _select(q_window, keys, lengths, *, snap: SnapKV, impl: str):
    return select_layer(snap, LayerInputs(keys, lengths.astype(jnp.int32), q_window), impl)


def _check_shapes(q_window, keys, lengths, snap) -> None:
    if not isinstance(snap, SnapKV):
        raise ValueError(f"snap must be a SnapKV (alias SnapKVConfig), got {type(snap).__name__}")
    if q_window.ndim != 4 or keys.ndim != 4 or lengths.ndim != 1:
        raise ValueError(f"expected q_window [B, H, w, D], keys [B, K, T, D], lengths [B]; got shapes "
                         f"{q_window.shape}, {keys.shape}, {lengths.shape}")
    b, h, w, d = q_window.shape
    if keys.shape[0] != b or lengths.shape[0] != b:
        raise ValueError(f"batch mismatch: q_window {q_window.shape}, keys {keys.shape}, "
                         f"lengths {lengths.shape}")
    if keys.shape[3] != d:
        raise ValueError(f"head_dim mismatch: q_window has {d}, keys have {keys.shape[3]}")
    if h % keys.shape[1]:
        raise ValueError(f"query heads {h} are not a multiple of KV heads {keys.shape[1]}")
    if w != snap.window:
        raise ValueError(f"q_window holds {w} queries but snap.window={snap.window}")
    check_lengths(lengths, keys.shape[2])


def select(q_window: jax.Array, keys: jax.Array, lengths: jax.Array, snapkv: SnapKV | None = None,
           impl: str = "auto", *, snap: SnapKV | None = None) -> jax.Array:
    """SnapKV selection: the prompt positions each KV head keeps, `[B, K, capacity]` int32.

    `snapkv`: the method's settings (DESIGN's name); `snap=` is the keyword this function took before,
    kept as an alias. Exactly one of them is given.

    q_window `[B, H, w, D]`: row b's queries of positions lengths[b]-w .. lengths[b]-1 (after RoPE,
    before the 1/sqrt(D) scale); keys `[B, K, T, D]` after RoPE; lengths `[B]` integers in [1, T] (checked
    where they are concrete; under the caller's jit only their dtype is). Rows with L > C get C ascending
    positions; rows with L <= C get 0 .. L-1 then -1. `impl`: "auto" (the best kernel that lowers on
    this GPU, else the `jnp` reference), "pallas" (the best kernel; off GPU the Triton one interpreted),
    "mosaic", "triton", or "xla" (the reference); pallas/dispatch.py says which runs where.

    Raises ValueError for mismatched shapes, H % K != 0, a window dim other than snap.window, or an
    unknown impl; RuntimeError when an explicit kernel impl cannot run here.
    """
    if (snapkv is None) == (snap is None):
        raise ValueError("give the SnapKV settings once: select(q_window, keys, lengths, snapkv)")
    snap = snapkv if snap is None else snap
    q_window, keys, lengths = jnp.asarray(q_window), jnp.asarray(keys), jnp.asarray(lengths)
    _check_shapes(q_window, keys, lengths, snap)
    impl = resolve_impl(impl, q_window.shape[3])
    return _select(q_window, keys, lengths, snap=snap, impl=impl)
