"""SnapKV observation-window scores: what is computed, and the `jnp` reference every kernel back-end is
tested against (window_scores_triton.py, Pallas Triton; dispatch.py picks one).

What is computed (SnapKV, arXiv 2404.14469, section 4.1 / Listing 1): for row b with L = lengths[b], window
w and query head h, the softmax (over keys, float32) of the last w prompt queries against all L keys,
causal inside the window, summed over the w queries, kept for the prefix positions j < L - w:

    scores[b, h, j] = sum_i softmax_j(q[b, h, i] . k[b, h // G, j] / sqrt(D))    for j < L - w, else 0

where window query i sits at absolute position L - w + i and sees keys j <= L - w + i (G = H // K query
heads per KV head). Scores stay per query head: SnapKV pools each head's scores before any reduction over
the heads of a GQA group, and max-pooling does not commute with that reduction.

Invariants every back-end keeps (tests/test_pallas_window_scores.py checks each against the reference):
  * output [B, H, T] float32; zeros at j >= L - w (so rows with L <= w are all zeros);
  * keys at positions >= L are never read, so padding may hold anything, even NaN;
  * float32 inputs use IEEE float32 dots, bfloat16 inputs bf16 dots; accumulation is float32 always.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def window_scores_reference(q_window: jax.Array, keys: jax.Array, lengths: jax.Array) -> jax.Array:
    """Observation-window scores in plain `jnp`, materialising [B, H, w, T] float32.

    q_window `[B, H, w, D]` (queries of positions L-w .. L-1, after RoPE, not yet scaled), keys
    `[B, K, T, D]` (after RoPE), lengths `[B]`. Returns `[B, H, T]` float32, zero at j >= L - w.
    """
    b, h, w, d = q_window.shape
    kv_heads, t = keys.shape[1], keys.shape[2]
    q = q_window.astype(jnp.float32).reshape(b, kv_heads, h // kv_heads, w, d)  # [B, K, G, w, D]
    logits = jnp.einsum("bkgwd,bktd->bkgwt", q, keys.astype(jnp.float32),
                        precision=lax.Precision.HIGHEST) / math.sqrt(d)        # [B, K, G, w, T]
    lengths = lengths.astype(jnp.int32)[:, None, None, None, None]
    query_pos = lengths - w + jnp.arange(w)[:, None]                           # [B, 1, 1, w, 1]
    visible = jnp.arange(t) <= query_pos                                       # [B, 1, 1, w, T]
    # Rows with L < w have window queries that see no key at all; keep them finite (they score nothing).
    top = jnp.max(jnp.where(visible, logits, -jnp.inf), axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    p = jnp.where(visible, jnp.exp(logits - top), 0.0)
    total = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(total > 0, total, 1.0)
    scores = jnp.sum(p, axis=3).reshape(b, h, t)                               # [B, H, T]
    in_prefix = jnp.arange(t) < lengths[:, :, 0, 0] - w                       # [B, 1, T]
    return jnp.where(in_prefix, scores, 0.0)
