"""H2O's key scores for one prompt chunk by a Pallas kernel lowered through Triton (the `jnp` references
and the definition of what is computed are in h2o_scores.py).

The kernel takes each query's log-sum-exp `lse` as an input instead of computing it: prefill's attention
has just computed it for the same queries and keys (models/chunked_attention.py returns it), so what is
left is one pass of `q . k` per (query, key) pair, half the FLOPs of the attention itself. Grid
(row, query head, key block): each program holds one block of keys of its KV head and streams the chunk's
queries that can see them (queries at positions >= the block's first key), accumulating
exp2(q.k * c - lse * log2(e)) over queries in a `[keys, queries]` float32 tile that is reduced once at the
end (c = log2(e) / sqrt(D)). Query blocks wholly after the key block and below the row's length need no
mask. Nothing of size `[c, T]` is ever stored.

Invariants: those of h2o_scores.py (tests/test_pallas_h2o_scores.py checks them against
`chunk_scores_reference`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from snapkv_jax.pallas.common import cdiv, compiler_params, dot_nt, query_block_ranges

_LOG2E = math.log2(math.e)


def _scores_kernel(len_ref, start_ref, q_ref, lse_ref, k_ref, o_ref, *, block_q, block_k, chunk, tokens,
                   scale):
    """One program per (row, query head, key block): the sum over the chunk's real queries i >= j of
    exp2(q_i . k_j * scale - lse_i) for each key j of the block."""
    # len_ref, start_ref []; q_ref [c', D]; lse_ref [c'] (base 2); k_ref [T, D]; o_ref [block_k]
    start = start_ref[...]
    limit = jnp.minimum(len_ref[...], start + chunk)                           # real queries: pos < limit
    first_key = pl.program_id(2) * block_k
    key_pos = first_key + jnp.arange(block_k)                                  # [bk]
    k = plgpu.load(k_ref.at[pl.ds(first_key, block_k), :], mask=(key_pos < limit)[:, None], other=0)

    live_lo, a_end, b_end, live_hi = query_block_ranges(first_key, block_k, start, limit, block_q)

    def step(i, acc, masked):
        q = plgpu.load(q_ref.at[pl.ds(i * block_q, block_q), :])               # [bq, D]
        lse = plgpu.load(lse_ref.at[pl.ds(i * block_q, block_q)])              # [bq]
        p = jnp.exp2(dot_nt(k, q) * scale - lse[None, :])                      # [bk, bq]
        if masked:
            query_pos = start + i * block_q + jnp.arange(block_q)              # [bq]
            seen = (key_pos[:, None] <= query_pos[None, :]) & (query_pos < limit)[None, :]
            p = jnp.where(seen, p, 0.0)
        return acc + p

    acc = jnp.zeros((block_k, block_q), jnp.float32)
    acc = lax.fori_loop(live_lo, a_end, functools.partial(step, masked=True), acc)
    acc = lax.fori_loop(a_end, b_end, functools.partial(step, masked=False), acc)
    acc = lax.fori_loop(b_end, jnp.maximum(b_end, live_hi), functools.partial(step, masked=True), acc)
    plgpu.store(o_ref.at[pl.ds(0, block_k)], jnp.sum(acc, axis=1), mask=key_pos < tokens)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "num_warps", "num_stages", "interpret"))
def h2o_chunk_scores(q_chunk: jax.Array, keys: jax.Array, lse: jax.Array, lengths: jax.Array, start, *,
                     block_q: int = 64, block_k: int = 64, num_warps: int = 4, num_stages: int = 2,
                     interpret: bool = False) -> jax.Array:
    """`chunk_scores_reference` by the Pallas kernel, given each query's natural log-sum-exp.

    q_chunk `[B, H, c, D]` (positions start .. start+c-1, after RoPE, unscaled), keys `[B, K, T, D]`
    (float32 or bfloat16; the chunk's queries cast to the keys' dtype), lse `[B, H, c]` float32 (of the
    causal logits q.k / sqrt(D), e.g. from `chunk_attention(..., with_lse=True)`), lengths `[B]`, start
    an int or traced int32 scalar. Returns `[B, H, T]` float32. `block_q`, `block_k`: powers of two >= 16.
    `interpret=True` runs the kernel on CPU. Shapes are trusted; head_dim must be `supported_head_dim`.
    """
    b, h, c, d = q_chunk.shape
    kv_heads, t = keys.shape[1], keys.shape[2]
    group = h // kv_heads
    padded = cdiv(c, block_q) * block_q
    q = jnp.pad(q_chunk.astype(keys.dtype), ((0, 0), (0, 0), (0, padded - c), (0, 0)))  # [B, H, c', D]
    lse2 = jnp.pad(lse.astype(jnp.float32) * _LOG2E, ((0, 0), (0, 0), (0, padded - c)))  # [B, H, c']
    starts = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (b,))
    row = pl.BlockSpec((None,), lambda i, j, s: (i,))
    return pl.pallas_call(
        functools.partial(_scores_kernel, block_q=block_q, block_k=block_k, chunk=c, tokens=t,
                          scale=_LOG2E / math.sqrt(d)),
        grid=(b, h, cdiv(t, block_k)),
        in_specs=[row, row,
                  pl.BlockSpec((None, None, padded, d), lambda i, j, s: (i, j, 0, 0)),
                  pl.BlockSpec((None, None, padded), lambda i, j, s: (i, j, 0)),
                  pl.BlockSpec((None, None, t, d), lambda i, j, s: (i, j // group, 0, 0))],
        out_specs=pl.BlockSpec((None, None, block_k), lambda i, j, s: (i, j, s)),
        out_shape=jax.ShapeDtypeStruct((b, h, t), jnp.float32),
        compiler_params=compiler_params(num_warps, num_stages), interpret=interpret, name="h2o_key_scores",
    )(lengths.astype(jnp.int32), starts, q, lse2, keys)
