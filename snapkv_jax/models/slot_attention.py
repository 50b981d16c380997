"""Attention of new queries over KV-cache slots: the attention step of `extend` and of decoding against a
shared context.

A query at position p sees every slot holding a position j with 0 <= j <= p (and, with a sliding window
W, j > p - W); empty slots (`pos = -1`) and slots of later positions are masked. So one mask covers the
row's old slots, the causal part among the segment's own tokens (written into the cache before they
attend), and holes left by compression.

Keys and values come in *parts*: the row's own slots `[B, K, S, D]` and, optionally, a context shared by
every row `[1, K, S_c, D]` (held once in memory, whatever B is). Each part's logits are computed by their
own batched matmul, the shared one with all B rows' queries against the one K/V (B times the arithmetic
intensity of a copied context), and the parts are merged by the split-softmax identity: with
m = max over both parts, softmax = exp(logit - m) / (sum_own + sum_ctx), so
out = (e_own . v_own + e_ctx . v_ctx) / (sum_own + sum_ctx). Hydragen (Juravsky et al., arXiv 2402.05099)
measured the same decomposition for shared prefixes. A single part is a plain float32 softmax, the same
arithmetic as `Attention.decode`.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class SlotPart:
    """One part of the slots a query attends to: k, v `[B, K, S, D]` (or `[1, K, S, D]` when `shared`),
    pos `[B, K, S]` (or `[1, K, S]`) int32, -1 for an empty slot. A pytree; `shared` is static."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    shared: bool = flax.struct.field(pytree_node=False, default=False)


def visible(pos: jax.Array, query_pos: jax.Array, sliding_window: int | None) -> jax.Array:
    """`[B', K, 1, c, S]` True where a query at `query_pos [B, c]` sees a slot holding `pos [B', K, S]`
    (B' = B, or 1 for a shared part, broadcasting)."""
    p = pos[:, :, None, None, :]                                                 # [B', K, 1, 1, S]
    q = query_pos[:, None, None, :, None]                                        # [B, 1, 1, c, 1]
    seen = (p >= 0) & (p <= q)
    if sliding_window is not None:
        seen &= p > q - sliding_window
    return seen


def _logits(q: jax.Array, part: SlotPart) -> jax.Array:
    """q `[B, K, G, c, D]` -> float32 logits `[B, K, G, c, S]` (unscaled)."""
    if part.shared:  # every row's queries against the one context: M = B * G * c rows per KV head
        return jnp.einsum("bkgcd,ksd->bkgcs", q, part.k[0], preferred_element_type=jnp.float32)
    return jnp.einsum("bkgcd,bksd->bkgcs", q, part.k, preferred_element_type=jnp.float32)


def _weighted_values(w: jax.Array, part: SlotPart) -> jax.Array:
    """weights `[B, K, G, c, S]` (v's dtype) -> `[B, K, G, c, D]`."""
    if part.shared:
        return jnp.einsum("bkgcs,ksd->bkgcd", w, part.v[0])
    return jnp.einsum("bkgcs,bksd->bkgcd", w, part.v)


def attend_slots(q: jax.Array, query_pos: jax.Array, parts: tuple[SlotPart, ...],
                 sliding_window: int | None) -> jax.Array:
    """Attention of q `[B, c, H, D]` (after RoPE, at positions `query_pos [B, c]`) over the slots of
    `parts`: `[B, c, H, D]` in the values' dtype. Float32 softmax; query head h reads KV head h // G.
    A query that sees no slot at all (possible only for padding) gets zeros."""
    b, c, h, d = q.shape
    kv_heads = parts[0].k.shape[1]
    qg = q.reshape(b, c, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)   # [B, K, G, c, D]
    logits = [jnp.where(visible(p.pos, query_pos, sliding_window), _logits(qg, p) / math.sqrt(d), -jnp.inf)
              for p in parts]                                                    # each [B, K, G, c, S]
    dtype = parts[0].v.dtype
    if len(parts) == 1:
        probs = jax.nn.softmax(logits[0], axis=-1)
        out = _weighted_values(jnp.where(jnp.isnan(probs), 0.0, probs).astype(dtype), parts[0])
    else:
        top = jnp.max(jnp.stack([jnp.max(l, axis=-1) for l in logits]), axis=0)[..., None]  # [B, K, G, c, 1]
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        weights = [jnp.exp(l - top) for l in logits]
        total = sum(jnp.sum(w, axis=-1, keepdims=True) for w in weights)          # [B, K, G, c, 1]
        acc = sum(_weighted_values(w.astype(dtype), p).astype(jnp.float32) for w, p in zip(weights, parts))
        out = (acc / jnp.where(total > 0, total, 1.0)).astype(dtype)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, c, h, d)                     # [B, c, H, D]
