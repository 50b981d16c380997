"""H2O's key scores for one prompt chunk by a Pallas Mosaic GPU kernel (Hopper and later, compute
capability >= 9.0; the `jnp` references and the definition of what is computed are in h2o_scores.py).

Like the Triton kernel (h2o_scores_triton.py) it takes each query's log-sum-exp from prefill's attention,
so what is left is one `k . q` per (key, query) pair. Grid (row, KV head, key block): a program (one
warpgroup) loads its block of keys once into shared memory and streams the queries of every query head
of the KV group that can see them (queries at positions >= the block's first key, below the row's
length) through shared memory with the bulk copy engine, `stages` query blocks in flight, one barrier
per in-flight copy. Each step multiplies the key block by a query block on the tensor cores (`wgmma`,
a [keys, queries] float32 tile), adds exp2(s * c - lse * log2(e)) into a running [keys, queries] tile,
and at each head's end sums it along the queries into that head's [keys] scores (c = log2(e) /
sqrt(D)). Query blocks wholly after the key block and below the length need no mask. So each key is read
once per KV group, not once per query head; nothing of size [c, T] is stored.

float32 inputs are split into bfloat16 pieces as in window_scores_mosaic.py (wgmma has no IEEE float32).
The leading piece product and the five small ones go to two accumulators, summed in registers: compiled on
an H200 with one accumulator, scores differed from the float32 reference by up to 2.0e-5 relative (the
interpreter: 1.9e-6), about what an error of 1e-4 in logits of size ~20 gives. The H2O scores take the
log-sum-exp from prefill's attention, so such an error is not cancelled as in the window-score kernel,
whose two passes make the same logits. Our reading (not measured): the tensor cores add the products
into a float32 accumulator without IEEE rounding, so small products added to a large sum lose bits; a
separate accumulator keeps the small products at their own scale. With the two, the float32 test passes
compiled on an H200 (2026-12-03, experiments/results/gpu_kernel_tests.log).
Every bulk copy stays inside its array, as in window_scores_mosaic.py (keys padded to whole key blocks, an
output as wide as the grid's blocks).
Off GPU the kernel runs in the Mosaic GPU interpreter of jax >= 0.11 (`interpret=True`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from snapkv_jax.pallas.common import cdiv, query_block_ranges
from snapkv_jax.pallas.window_scores_mosaic import (compiler_params, interpret_params, key_pieces, load,
                                                    piece_products, pieces, smem_transforms)

_LOG2E = math.log2(math.e)
_SMEM_BYTES = 200 * 1024


def _scores_kernel(len_ref, start_ref, q_ref, lse_ref, k_ref, o_ref, q_smem, lse_smem, k_smem, o_smem, q_bars,
                   lse_bars, k_bars, *, group, block_q, block_k, chunk, stages, n_pieces, scale):
    """One program per (row, KV head, key block): for each query head g of the group and each key j of
    the block, the sum over the chunk's real queries i >= j of exp2(q_i . k_j * scale - lse_i)."""
    # len_ref, start_ref [B] (GMEM); q_ref [P, B, K, G, c', D]; lse_ref [B, K, G, c'] (base 2);
    # k_ref [P, B, K, T', D]; o_ref [B, K, G, T'] (T' = T in whole key blocks)
    # q_smem [stages, P, bq, D]; lse_smem [stages, bq]; k_smem [P, bk, D]; o_smem [G, bk]
    b, kv, block = lax.axis_index("b"), lax.axis_index("k"), lax.axis_index("j")
    start = start_ref[b]
    limit = jnp.minimum(len_ref[b], start + chunk)                             # real queries: pos < limit
    first_key = block * block_k

    live_lo, a_end, b_end, live_hi = query_block_ranges(first_key, block_k, start, limit, block_q)
    # Keys at or past the limit are seen by no real query: such a block loads nothing and scores zero.
    n_q = jnp.where(first_key < limit, jnp.maximum(live_hi - live_lo, 0), 0)  # query blocks per head
    n_steps = group * n_q

    def fetch(t, slot):
        """Step t's copies (head t // n_q, query block live_lo + t % n_q) into `slot`."""
        head, i = lax.div(t, n_q), live_lo + lax.rem(t, n_q)
        rows = pl.ds(i * block_q, block_q)
        for p in range(n_pieces):
            plgpu.copy_gmem_to_smem(q_ref.at[p, b, kv, head, rows], q_smem.at[slot, p],
                                    q_bars.at[slot * n_pieces + p])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, kv, head, rows], lse_smem.at[slot], lse_bars.at[slot])

    @pl.when(n_steps > 0)
    def _():
        for p in range(n_pieces):
            plgpu.copy_gmem_to_smem(k_ref.at[p, b, kv, pl.ds(first_key, block_k)], k_smem.at[p], k_bars.at[p])

    for slot in range(stages):
        pl.when(slot < n_steps)(functools.partial(fetch, slot, slot))

    def step(i, acc, head, masked):
        t = head * n_q + i - live_lo
        slot = lax.rem(t, stages)
        for p in range(n_pieces):
            plgpu.barrier_wait(q_bars.at[slot * n_pieces + p])
        plgpu.barrier_wait(lse_bars.at[slot])

        def logits(pairs):
            def multiply(acc_ref):
                for qp, kp in pairs:
                    plgpu.wgmma(acc_ref, k_smem.at[kp], q_smem.at[slot, qp].transpose((1, 0)))
                return acc_ref[...]
            return pl.run_scoped(multiply, plgpu.ACC((block_k, block_q), jnp.float32))  # [bk, bq]

        # float32: the leading product (hi . hi) and the five small ones in separate accumulators, added
        # in registers (see the module docstring).
        pairs = piece_products(n_pieces)
        s = logits(pairs) if n_pieces == 1 else logits(pairs[:1]) + logits(pairs[1:])
        lse = load(lse_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))            # [bq], along columns
        # The slot is read (wgmma waited for, lse in registers): refill it.
        pl.when(t + stages < n_steps)(functools.partial(fetch, t + stages, slot))
        p = jnp.exp2(s * scale - lax.broadcast_in_dim(lse, s.shape, (1,)))
        if masked:
            key_pos = first_key + plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
            query_pos = start + i * block_q + plgpu.broadcasted_iota(jnp.int32, s.shape, 1,
                                                                     layout=plgpu.Layout.WGMMA)
            p = jnp.where((key_pos <= query_pos) & (query_pos < limit), p, 0.0)
        return acc + p

    def head_scores(head, carry):
        acc = plgpu.layout_cast(jnp.zeros((block_k, block_q), jnp.float32), plgpu.Layout.WGMMA)
        acc = lax.fori_loop(live_lo, a_end, functools.partial(step, head=head, masked=True), acc)
        acc = lax.fori_loop(a_end, b_end, functools.partial(step, head=head, masked=False), acc)
        acc = lax.fori_loop(b_end, jnp.maximum(b_end, live_hi), functools.partial(step, head=head, masked=True),
                            acc)
        o_smem.at[head][...] = jnp.sum(acc, axis=1)
        return carry

    @pl.when(n_steps > 0)
    def _():
        for p in range(n_pieces):
            plgpu.barrier_wait(k_bars.at[p])
        lax.fori_loop(0, group, head_scores, 0)

    @pl.when(n_steps == 0)
    def _():
        for head in range(group):
            o_smem.at[head][...] = plgpu.layout_cast(jnp.zeros((block_k,), jnp.float32),
                                                     plgpu.Layout.WGMMA.reduce(1))

    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, kv, :, pl.ds(first_key, block_k)])
    plgpu.wait_smem_to_gmem(0)


def unsupported(group: int, head_dim: int, dtype, block_q: int = 64, block_k: int = 64,
                stages: int = 2) -> str | None:
    """Why `h2o_chunk_scores` cannot take this shape class, or None when it can."""
    n_pieces = 3 if jnp.dtype(dtype) == jnp.float32 else 1
    smem = 2 * head_dim * n_pieces * (block_k + stages * block_q) + 4 * stages * block_q + 4 * group * block_k
    if smem > _SMEM_BYTES:
        return (f"the Mosaic H2O tiles need {smem} bytes of shared memory (> {_SMEM_BYTES}) for "
                f"{jnp.dtype(dtype).name} of head_dim {head_dim}")
    return None


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "stages", "interpret"))
def h2o_chunk_scores(q_chunk: jax.Array, keys: jax.Array, lse: jax.Array, lengths: jax.Array, start, *,
                     block_q: int = 64, block_k: int = 64, stages: int = 2, interpret=False) -> jax.Array:
    """`chunk_scores_reference` by the Mosaic GPU kernel, given each query's natural log-sum-exp; same
    signature and contract as h2o_scores_triton.h2o_chunk_scores.

    q_chunk `[B, H, c, D]` (positions start .. start+c-1, after RoPE, unscaled), keys `[B, K, T, D]`
    (bfloat16 or float32; the chunk's queries cast to the keys' dtype), lse `[B, H, c]` float32, lengths
    `[B]`, start an int or traced int32 scalar. Returns `[B, H, T]` float32. `block_q` a multiple of 32,
    `block_k` of 64; `stages` query blocks in flight. `interpret=True` runs the kernel in the Mosaic GPU
    interpreter (CPU; jax >= 0.11). Raises NotImplementedError for tiles larger than shared memory.
    """
    b, h, c, d = q_chunk.shape
    kv_heads, t = keys.shape[1], keys.shape[2]
    group = h // kv_heads
    if block_q % 32 or block_k % 64:
        raise ValueError(f"block_q must be a multiple of 32 and block_k of 64, got {block_q}, {block_k}")
    if reason := unsupported(group, d, keys.dtype, block_q, block_k, stages):
        raise NotImplementedError(reason)
    k_pieces, n_pieces = key_pieces(keys, block_k)                             # [P, B, K, T', D]
    padded = cdiv(c, block_q) * block_q
    q = jnp.pad(q_chunk.astype(keys.dtype), ((0, 0), (0, 0), (0, padded - c), (0, 0)))
    q_pieces, _ = pieces(q.reshape(b, kv_heads, group, padded, d))            # [P, B, K, G, c', D]
    lse2 = jnp.pad(lse.astype(jnp.float32) * _LOG2E, ((0, 0), (0, 0), (0, padded - c)))
    lse2 = lse2.reshape(b, kv_heads, group, padded)                            # [B, K, G, c']
    starts = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (b,))
    tiles = smem_transforms(d)
    scores = plgpu.kernel(
        functools.partial(_scores_kernel, group=group, block_q=block_q, block_k=block_k, chunk=c, stages=stages,
                          n_pieces=n_pieces, scale=_LOG2E / math.sqrt(d)),
        out_type=jax.ShapeDtypeStruct((b, kv_heads, group, k_pieces.shape[3]), jnp.float32),
        scratch_types=[plgpu.SMEM((stages, n_pieces, block_q, d), jnp.bfloat16, transforms=tiles),
                       plgpu.SMEM((stages, block_q), jnp.float32),
                       plgpu.SMEM((n_pieces, block_k, d), jnp.bfloat16, transforms=tiles),
                       plgpu.SMEM((group, block_k), jnp.float32),
                       plgpu.Barrier(num_barriers=stages * n_pieces), plgpu.Barrier(num_barriers=stages),
                       plgpu.Barrier(num_barriers=n_pieces)],
        grid=(b, kv_heads, cdiv(t, block_k)), grid_names=("b", "k", "j"), compiler_params=compiler_params(),
        interpret=interpret_params(interpret),
    )(lengths.astype(jnp.int32), starts, q_pieces, lse2, k_pieces)             # [B, K, G, T']
    return scores[..., :t].reshape(b, h, t)
