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
    # cuDNN flash attention for a shared part (GPU, bf16/fp16): its occupied slots are a prefix, the same
    # in every KV head, and every query sees all of them (no sliding window). Checked by the caller.
    flash: bool = flax.struct.field(pytree_node=False, default=False)
    # A flash part's key blocks, `flash_blocks(pos, heads, queries)`, when a caller that attends to the same
    # part many times (the decode loop) has computed them once; None: computed at each call.
    blocks: tuple[jax.Array, jax.Array] | None = None


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
    logits = [None if p.flash else
              jnp.where(visible(p.pos, query_pos, sliding_window), _logits(qg, p) / math.sqrt(d), -jnp.inf)
              for p in parts]                                                    # each [B, K, G, c, S]
    dtype = parts[0].v.dtype
    if len(parts) == 1:
        probs = jax.nn.softmax(logits[0], axis=-1)
        out = _weighted_values(jnp.where(jnp.isnan(probs), 0.0, probs).astype(dtype), parts[0])
        return out.transpose(0, 3, 1, 2, 4).reshape(b, c, h, d)                 # [B, c, H, D]
    outs, lses = zip(*[_flash_part(q, p) if p.flash else _part(l, p, dtype) for l, p in zip(logits, parts)])
    top = jnp.max(jnp.stack(lses), axis=0)                                        # [B, K, G, c]
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = [jnp.exp(lse - top)[..., None] for lse in lses]
    total = sum(weights)
    out = sum(w * o for w, o in zip(weights, outs)) / jnp.where(total > 0, total, 1.0)
    return out.astype(dtype).transpose(0, 3, 1, 2, 4).reshape(b, c, h, d)       # [B, c, H, D]


def _part(logits: jax.Array, part: SlotPart, dtype):
    """One part's normalised float32 output `[B, K, G, c, D]` and log-sum-exp `[B, K, G, c]` (-inf where a
    query sees none of its slots) from its masked logits."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.exp(logits - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    out = _weighted_values(e.astype(dtype), part).astype(jnp.float32) / jnp.where(total > 0, total, 1.0)
    return out, jnp.where(total[..., 0] > 0, top[..., 0] + jnp.log(total[..., 0]), -jnp.inf)


def _flash_splits(slots: int, heads: int, queries: int) -> int:
    """Key blocks per KV head for the flash pass: enough work items (query head x 128-query tile x key
    block, about what cuDNN gives a thread block) for one wave on a GPU's ~132 SMs, blocks of at least
    512 keys, dividing `slots`. One wave is the fastest: 64 queries of 32 heads over a 32K context took
    141 / 150 / 159 / 167 us per layer with 4 / 8 / 16 / 32 blocks per head (128 to 1,024 items) and 250
    us with 2; 64 rows of one query 147 / 147 / 157 / 170 us; one query 128 us with 1-8 blocks, 136 us
    with 16 (H200, 2026-12-04, `probe_extend_kernels.md`). More blocks only add loads of the query tile
    and partial results to merge."""
    items = heads * -(-queries // 128)
    n = 1
    while items * n < 128 and slots % (2 * n) == 0 and slots // (2 * n) >= 512:
        n *= 2
    return n


def flash_blocks(pos: jax.Array, heads: int, queries: int) -> tuple[jax.Array, jax.Array]:
    """The key blocks `_flash_part` splits a shared part holding `pos [1, K, S]` into, for `queries` queries
    of `heads` heads: (each block's kv_seqlen for cuDNN `[K * n]`, at least 1; whether it holds any key
    `[K * n]`). Depends on the part alone: inside a decode loop it is loop-invariant, and computed per
    step it was 64 one-thread-block kernels of a Llama-2-7B step (H200, 2026-12-03)."""
    _, kv_heads, slots = pos.shape
    n = _flash_splits(slots, heads, queries)
    block = slots // n
    occupied = jnp.sum(pos[0, 0] >= 0).astype(jnp.int32)
    seen = jnp.clip(occupied - jnp.arange(n, dtype=jnp.int32) * block, 0, block)  # [n] keys per block
    seen = jnp.tile(seen, kv_heads)                                             # [K*n]
    return jnp.maximum(seen, 1), seen > 0                                       # cuDNN refuses 0


def _flash_part(q: jax.Array, part: SlotPart):
    """A shared part by cuDNN flash attention (so the [B, H, c, S] logits are never written to memory).

    Split-K: the context's keys `[1, K, S, D]` are viewed, without a copy, as n blocks per KV head,
    `[K * n, 1, S / n, D]`, each a cuDNN batch entry with its own kv_seqlen (the occupied prefix's part in
    that block, `flash_blocks`) and every row's queries of that head's group as one sequence
    `[K * n, G, B * c, D]`. One call over all K * n entries keeps the GPU busy even for few queries (with
    one entry per head, a 64-row decode step over a 32K context took 2.74x the read roofline, H200,
    2026-12-02); the n partial softmaxes merge by their log-sum-exp, as the parts do in `attend_slots`. A
    block with no occupied key gets kv_seqlen 1 (cuDNN refuses 0) and is then dropped from the merge."""
    from snapkv_jax.models.chunked_attention import _cudnn
    b, c, h, d = q.shape
    _, kv_heads, slots, _ = part.k.shape
    g = h // kv_heads
    lengths, real = flash_blocks(part.pos, h, b * c) if part.blocks is None else part.blocks  # [K*n] each
    n = lengths.shape[0] // kv_heads
    block = slots // n
    qg = q.reshape(b, c, kv_heads, g, d).transpose(2, 3, 0, 1, 4).reshape(kv_heads, 1, g, b * c, d)
    qg = jnp.broadcast_to(qg, (kv_heads, n, g, b * c, d)).reshape(kv_heads * n, g, b * c, d)
    k = part.k.reshape(kv_heads * n, 1, block, d)                               # [K*n, 1, S/n, D]
    v = part.v.reshape(kv_heads * n, 1, block, d)
    out, lse = _cudnn(qg, k, v, causal=False, kv_seqlen=lengths)
    real = real[:, None, None]                                                  # [K*n, 1, 1]
    out = jnp.where(real[..., None], out.astype(jnp.float32), 0.0).reshape(kv_heads, n, g, b, c, d)
    lse = jnp.where(real, lse, -jnp.inf).reshape(kv_heads, n, g, b, c)
    top = jnp.max(lse, axis=1)                                                  # [K, G, B, c]
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp(lse - top[:, None])                                             # [K, n, G, B, c]
    total = jnp.sum(w, axis=1)
    merged = jnp.sum(w[..., None] * out, axis=1) / jnp.where(total > 0, total, 1.0)[..., None]
    lse = jnp.where(total > 0, top + jnp.log(total), -jnp.inf)
    return merged.transpose(2, 0, 1, 3, 4), lse.transpose(2, 0, 1, 3)          # [B, K, G, c, D], [B, K, G, c]
