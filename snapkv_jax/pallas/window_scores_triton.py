"""SnapKV observation-window scores by a Pallas kernel lowered through Triton (Ampere and later; the
`jnp` reference and the definition of what is computed are in window_scores.py).

The kernel never materialises the [H, w, T] probabilities. It runs two launches over a grid of
(row, KV head, key chunk); each program holds the G*w window queries of its KV group as one [M, D] tile
(M = G*w padded to a power of two >= 16, as Triton's dot needs), so each key is read once per KV group:
  pass 1 streams its chunk's keys and writes, per query row, the max m of its visible logits and
         l = sum exp2((logit - m) * c); a tiny `jnp` step merges the chunks into one log-sum-exp per row;
  pass 2 streams the prefix keys again, computes exp2(logit * c - lse) as a [keys, rows] tile (so the sums
         over each head's w rows stay within a warp) and writes the per-head sums. It walks each chunk
         backwards, starting on the blocks pass 1 read last, which the device's L2 may still hold (on
         an H200 its programs run in several waves and the change measured no faster, 2026-12-05; it
         is for the A100's 40 MB L2, not yet timed there).
c = log2(e) / sqrt(D) is applied inside one fused multiply-add per logit. Keys below L - w are visible to
every window query, so only the last few blocks of each pass pay for masks. Keys are read twice from HBM
(the second read is the price of not storing [H, w, T]); queries and scores once. Splitting keys into
chunks gives B*K*chunks programs, enough to fill the GPU at batch 1 even with 8 KV heads.
Measured on an H100 (experiments/results/snapkv_kernel_bench.md): both passes together move bytes at
70-108% of the device copy rate for 32/32 heads at 16K-1M tokens, 50-88% for 32/8 heads at 32K-1M.

Invariants: those of window_scores.py (tests/test_pallas_window_scores.py checks them against
`window_scores_reference`); keys past L are never read because their loads are masked.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from snapkv_jax.pallas.common import MASK, cdiv, compiler_params, dot_nt, merge_partial_lse, seen_max

# Logits of [M, block_k] float32 per program: 8K values is 64 registers per thread at 4 warps.
_MAX_TILE = 64 * 128
# Programs to aim for per launch: a few waves on a 108- (A100) or 132-SM (H100) GPU.
_TARGET_PROGRAMS = 1024


def _block_counts(start, bulk_end, end, block_k, chunk):
    """Within the chunk of keys [start, start + chunk): the number of whole blocks below `bulk_end`
    (no masks needed) and of blocks that start below `end` (the rest need masks)."""
    whole = jnp.minimum(lax.div(jnp.maximum(bulk_end - start, 0), block_k), chunk // block_k)
    touched = jnp.minimum(lax.div(jnp.maximum(end - start, 0) + block_k - 1, block_k), chunk // block_k)
    return whole, touched


def _lse_kernel(len_ref, q_ref, k_ref, m_ref, l_ref, *, window, block_k, chunk, scale):
    """Pass 1, one program per (row, KV head, key chunk): per window query row, the max m of its visible
    raw logits q.k in this chunk and l = sum exp2((q.k - m) * scale)."""
    # len_ref []; q_ref [M, D]; k_ref [T, D]; m_ref, l_ref [M]
    length = len_ref[...]
    start = pl.program_id(2) * chunk
    q = q_ref[...]                                                             # [M, D]
    rows = q.shape[0]
    query_pos = length - window + lax.rem(jnp.arange(rows), window)            # [M]
    # Keys below L - w are visible to every window query: those blocks skip the causal mask.
    n_bulk, n_all = _block_counts(start, length - window, length, block_k, chunk)

    def step(j, carry, masked):
        m, l = carry
        first = start + j * block_k
        if masked:
            key_pos = first + jnp.arange(block_k)                              # [bk]
            k = plgpu.load(k_ref.at[pl.ds(first, block_k), :], mask=(key_pos < length)[:, None], other=0)
            s = jnp.where(key_pos[None, :] <= query_pos[:, None], dot_nt(q, k), MASK)  # [M, bk]
        else:
            s = dot_nt(q, plgpu.load(k_ref.at[pl.ds(first, block_k), :]))     # [M, bk]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp2(s * scale - (seen_max(m_new) * scale)[:, None])
        return m_new, l * jnp.exp2((m - m_new) * scale) + jnp.sum(p, axis=1)

    init = (jnp.full((rows,), MASK, jnp.float32), jnp.zeros((rows,), jnp.float32))
    carry = lax.fori_loop(0, n_bulk, functools.partial(step, masked=False), init)
    m, l = lax.fori_loop(n_bulk, n_all, functools.partial(step, masked=True), carry)
    m_ref[...] = m
    l_ref[...] = l


def _scores_kernel(len_ref, q_ref, lse_ref, k_ref, o_ref, *, window, group, block_k, chunk, scale,
                   tokens):
    """Pass 2, one program per (row, KV head, key chunk): for each prefix key of the chunk and each
    query head g of the group, the sum over g's w window rows of exp2(q.k * scale - lse); zeros past
    the prefix. Logits are [keys, rows] here, so the sums over rows stay inside a warp."""
    # len_ref []; q_ref [M, D]; lse_ref [M] (base 2, scaled); k_ref [T, D]; o_ref [G, chunk]
    prefix = len_ref[...] - window
    start = pl.program_id(2) * chunk
    q, lse = q_ref[...], lse_ref[...]                                          # [M, D], [M]
    rows = q.shape[0]
    head = lax.div(jnp.arange(rows), window)                                   # [M]; >= G on pad rows
    n_bulk, n_live = _block_counts(start, prefix, prefix, block_k, chunk)

    def store(j, g, values):  # values [n, bk]: heads g .. g+n-1 of key block j
        key_pos = start + j * block_k + jnp.arange(block_k)
        plgpu.store(o_ref.at[pl.ds(g, values.shape[0]), pl.ds(j * block_k, block_k)], values,
                    mask=(key_pos < tokens)[None, :])

    def store_head_sums(j, p):  # p [bk, M]
        if rows == group * window:  # w and G powers of two: one reduction over [bk, G, w]
            store(j, 0, jnp.sum(p.reshape(block_k, group, window), axis=2).T)
        else:
            for g in range(group):
                store(j, g, jnp.sum(jnp.where(head[None, :] == g, p, 0.0), axis=1)[None, :])

    def step(j, carry, masked):
        first = start + j * block_k
        if masked:
            in_prefix = first + jnp.arange(block_k) < prefix                   # [bk]
            k = plgpu.load(k_ref.at[pl.ds(first, block_k), :], mask=in_prefix[:, None], other=0)
        else:
            k = plgpu.load(k_ref.at[pl.ds(first, block_k), :])
        p = jnp.exp2(dot_nt(k, q) * scale - lse[None, :])                     # [bk, M]
        if masked:
            p = jnp.where(in_prefix[:, None], p, 0.0)
        store_head_sums(j, p)
        return carry

    def dead(j, carry):
        for g in range(group):
            store(j, g, jnp.zeros((1, block_k), jnp.float32))
        return carry

    # The chunk backwards: pass 1 ended on its last blocks (module docstring).
    masked, bulk = functools.partial(step, masked=True), functools.partial(step, masked=False)
    lax.fori_loop(0, n_live - n_bulk, lambda i, c: masked(n_live - 1 - i, c), 0)
    lax.fori_loop(0, n_bulk, lambda i, c: bulk(n_bulk - 1 - i, c), 0)
    lax.fori_loop(n_live, chunk // block_k, dead, 0)


def _plan(batch: int, kv_heads: int, rows: int, tokens: int, block_k: int | None, programs: int):
    """Static tiling: (block_k, chunk, splits). block_k keeps the [M, block_k] logits tile <= _MAX_TILE;
    a chunk (a multiple of block_k) is what one program streams, sized for about `programs` programs."""
    if block_k is None:
        block_k = max(16, min(128, _MAX_TILE // rows))
    n_blocks = cdiv(tokens, block_k)
    per_program = max(1, cdiv(n_blocks * batch * kv_heads, programs))
    chunk = per_program * block_k
    return block_k, chunk, cdiv(tokens, chunk)


@functools.partial(jax.jit, static_argnames=("block_k", "programs", "num_warps", "num_stages",
                                             "interpret"))
def window_scores(q_window: jax.Array, keys: jax.Array, lengths: jax.Array, *, block_k: int | None = None,
                  programs: int = _TARGET_PROGRAMS, num_warps: int = 4, num_stages: int = 2,
                  interpret: bool = False) -> jax.Array:
    """Observation-window scores by the Pallas kernel; same contract as `window_scores_reference`.

    q_window `[B, H, w, D]`, keys `[B, K, T, D]` (float32 or bfloat16, the same dtype), lengths `[B]`.
    Returns `[B, H, T]` float32. Tiling: `block_k` keys per step (a power of two >= 16; default from the
    tile budget), `programs` the grid size to aim for (keys split into B*K*chunks programs).
    `interpret=True` runs the kernel on CPU. Shapes are trusted (the caller, `snapkv.select`, validates
    them); head_dim must satisfy `supported_head_dim`.
    """
    b, h, w, d = q_window.shape
    kv_heads, t = keys.shape[1], keys.shape[2]
    group = h // kv_heads
    rows = max(16, 1 << (group * w - 1).bit_length())
    block_k, chunk, splits = _plan(b, kv_heads, rows, t, block_k, programs)
    params = compiler_params(num_warps, num_stages)
    scale = math.log2(math.e) / math.sqrt(d)
    lengths = lengths.astype(jnp.int32)
    q = q_window.astype(keys.dtype).reshape(b, kv_heads, group * w, d)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - group * w), (0, 0)))           # [B, K, M, D]

    length_spec = pl.BlockSpec((None,), lambda i, j, s: (i,))
    q_spec = pl.BlockSpec((None, None, rows, d), lambda i, j, s: (i, j, 0, 0))
    keys_spec = pl.BlockSpec((None, None, t, d), lambda i, j, s: (i, j, 0, 0))
    partial_spec = pl.BlockSpec((None, None, None, rows), lambda i, j, s: (i, j, s, 0))
    m, l = pl.pallas_call(
        functools.partial(_lse_kernel, window=w, block_k=block_k, chunk=chunk, scale=scale),
        grid=(b, kv_heads, splits),
        in_specs=[length_spec, q_spec, keys_spec],
        out_specs=[partial_spec, partial_spec],
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads, splits, rows), jnp.float32)] * 2,
        compiler_params=params, interpret=interpret, name="snapkv_window_lse",
    )(lengths, q, keys)                                                        # [B, K, splits, M] each

    lse = merge_partial_lse(m, l, scale, axis=2)                               # [B, K, M]

    scores = pl.pallas_call(
        functools.partial(_scores_kernel, window=w, group=group, block_k=block_k, chunk=chunk,
                          scale=scale, tokens=t),
        grid=(b, kv_heads, splits),
        in_specs=[length_spec, q_spec, pl.BlockSpec((None, None, rows), lambda i, j, s: (i, j, 0)),
                  keys_spec],
        out_specs=pl.BlockSpec((None, None, group, chunk), lambda i, j, s: (i, j, 0, s)),
        out_shape=jax.ShapeDtypeStruct((b, kv_heads, group, t), jnp.float32),
        compiler_params=params, interpret=interpret, name="snapkv_window_scores",
    )(lengths, q, lse, keys)                                                   # [B, K, G, T]
    return scores.reshape(b, h, t)
