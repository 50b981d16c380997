"""SnapKV observation-window scores by Pallas Mosaic GPU kernels (Hopper and later, compute capability
>= 9.0; the `jnp` reference and the definition of what is computed are in window_scores.py).

The same two passes as the Triton kernel (window_scores_triton.py), written for Hopper: each program
(one warpgroup) owns a chunk of one KV head's keys and streams it through shared memory with the bulk
copy engine (TMA), `stages` blocks in flight, one barrier per in-flight copy. The G*w window queries of
the KV group form one tile of `rows` (each head's w rows padded to a multiple of 8, the tile to a multiple
of 64), so each key block is read once per KV group and multiplied on the tensor cores (`wgmma`) by all
of the group's query heads at once:
  pass 1 computes s = q . k^T as a [rows, keys] tile and keeps, per query row, the running max m of its
         visible logits and l = sum exp2((s - m) * c) (reductions along a row stay inside a quad of
         threads); a tiny `jnp` step merges the chunks into one base-2 log-sum-exp per row;
  pass 2 computes s = k . q^T as a [keys, rows] tile, exp2(s * c - lse) for each, and sums each head's
         columns (again within a quad), writing [G, keys] per block. It walks each chunk backwards:
         pass 1 ended on the chunks' last blocks, which the device's L2 may still hold when pass 2
         starts (at 32K tokens with 8 KV heads the keys are 64 MiB, an H200's L2 50 MB). Measured on
         an H200 against the forward walk (2026-12-05): the passes' share of the read roofline went
         from 67% to 71% for GQA 32/8 at 32K and from 88% to 99% for 32/32 at 16K.
Keys below L - w are visible to every window query, so only the last blocks of each pass build masks;
blocks past a row's length are never loaded (pass 2 writes their zeros). c = log2(e) / sqrt(D).

Every bulk copy stays inside its array: keys are padded to whole key blocks and pass 2's output is as wide
as the grid's blocks (`splits * chunk`, cut to T afterwards). Compiled on an H200 (jax 0.11.2, 2026-12-03),
the earlier version, which let the last block of a row reach past T (and a program's chunk past T) and
relied on the copy engine to clip those copies, returned zeros in whole rows of other sequences; the CPU
interpreter clips them, so only the GPU showed it.

float32 inputs: wgmma has no IEEE float32 mode (its float32 input is TF32), so each float32 operand is
split into three bfloat16 pieces (hi + mid + lo carry all 24 bits of the significand) and the six piece
products down to 2^-16 of the leading one are accumulated in float32; what is dropped is below float32
rounding of the logits. That reads 1.5x the key bytes: float32 is for exactness, bfloat16 for speed.

What it cannot run (ValueError or NotImplementedError when traced, so dispatch.py falls back): more than
256 query rows per KV group (G * w rounded up), a float32 tile set larger than shared memory.

Off GPU: jax >= 0.11 interprets Mosaic GPU kernels on the CPU (`interpret=True` here uses its
`InterpretGPUParams`, which simulates the copies, barriers and wgmma), and the CPU tests run the kernel
that way; jax 0.10's interpreter lacks rules this kernel needs, so the tests skip there.
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from snapkv_jax.pallas.common import MASK, cdiv, merge_partial_lse, round_up, seen_max, split_bfloat16

_MAX_ROWS = 256            # wgmma's largest N (pass 2 multiplies keys by all rows at once)
_SMEM_BYTES = 200 * 1024   # of the 227 KB a Hopper block may use; the rest for reductions and barriers
_TARGET_PROGRAMS = 256     # about two programs per SM of 132: bench_snapkv_kernel.md, H200 sweep


def interpret_params(interpret):
    """What `plgpu.kernel(interpret=)` takes for `interpret`: None (compile) for False, the GPU
    interpreter's default parameters for True, or the `plgpu.InterpretGPUParams` given (e.g. with
    `detect_races=True`)."""
    if interpret is False:
        return None
    if not hasattr(plgpu, "InterpretGPUParams"):
        raise NotImplementedError(f"Mosaic GPU interpret mode needs jax >= 0.11 (this is jax {jax.__version__})")
    return plgpu.InterpretGPUParams() if interpret is True else interpret


def smem_transforms(head_dim: int):
    """Tiling and swizzle of a bfloat16 [n, head_dim] tile in shared memory, as TMA writes it and wgmma
    reads it: 8-row tiles as wide as the swizzle (128 bytes, or the whole row when it is shorter)."""
    swizzle = min(128, 2 * head_dim)
    return plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle)


def compiler_params():
    # Lane semantics: explicit register layouts (the wgmma accumulator's, its row and column vectors).
    # approx_math: exp2 as one ex2.approx.ftz.f32 (as Triton's exp2), relative error ~2^-22.
    return plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane)


def load(ref, layout):
    """`plgpu.load` of a whole ref into registers of `layout`: jax 0.10 takes the index as a positional
    argument, jax 0.11 deprecates it (index the ref instead)."""
    if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def pieces(x: jax.Array) -> tuple[jax.Array, int]:
    """`x` as bfloat16 pieces stacked on a new leading axis, and how many: bfloat16 as itself (a free
    reshape), float32 as three (hi, mid, lo; `split_bfloat16`)."""
    if x.dtype == jnp.bfloat16:
        return x[None], 1
    if x.dtype == jnp.float32:
        return jnp.stack(split_bfloat16(x)), 3
    raise NotImplementedError(f"the Mosaic kernels take bfloat16 or float32, got {x.dtype}")


def key_pieces(keys: jax.Array, block: int) -> tuple[jax.Array, int]:
    """`pieces` of keys `[B, K, T, D]` as `[P, B, K, T', D]`, T' = T rounded up to whole key blocks of
    `block`, so that no bulk copy reads past the end of the tokens (a copy when T is not a multiple of
    `block`; prefill's bucketed widths from 256 on are multiples of 128)."""
    t = keys.shape[2]
    if t % block:
        keys = jnp.pad(keys, ((0, 0), (0, 0), (0, round_up(t, block) - t), (0, 0)))
    return pieces(keys)


def piece_products(n: int) -> tuple[tuple[int, int], ...]:
    """(q piece, k piece) pairs whose products are kept: all with index sum <= n - 1 (for n = 3 the six
    products from 2^0 down to 2^-16 of the leading one)."""
    return tuple((a, b) for a in range(n) for b in range(n) if a + b < n)


def _issue(src, dst, barrier):
    plgpu.copy_gmem_to_smem(src, dst, barrier)


def _fetch_keys(k_ref, k_smem, k_bars, b, kv, start, block_k: int, n_pieces: int, j, slot):
    """Starts the copies of key block j (every piece) of row b, KV head kv into stage `slot`, each piece
    on its own barrier (both passes stream keys this way)."""
    for p in range(n_pieces):
        _issue(k_ref.at[p, b, kv, pl.ds(start + j * block_k, block_k)], k_smem.at[slot, p],
               k_bars.at[slot * n_pieces + p])


def _lse_kernel(len_ref, q_ref, k_ref, ml_ref, q_smem, k_smem, ml_smem, q_bars, k_bars, *, window, padded,
                rows, block_k, chunk, stages, n_pieces, scale):
    """Pass 1, one program per (row, KV head, key chunk): per query row, the max m of its visible raw
    logits in this chunk and l = sum exp2((s - m) * scale) (m = MASK, l = 0 when it sees none)."""
    # len_ref [B] (GMEM); q_ref [P, B, K, rows, D]; k_ref [P, B, K, T', D]; ml_ref [B, K, splits, 2, rows]
    # q_smem [P, rows, D]; k_smem [stages, P, bk, D]; ml_smem [2, rows]
    b, kv, split = lax.axis_index("b"), lax.axis_index("k"), lax.axis_index("s")
    length = len_ref[b]
    start = split * chunk
    n_blocks = chunk // block_k
    # Blocks below L - w need no mask (every window query sees them); blocks from L on are not read.
    n_bulk = jnp.clip(lax.div(length - window - start, block_k), 0, n_blocks)
    n_all = jnp.clip(lax.div(length - start + block_k - 1, block_k), 0, n_blocks)

    for p in range(n_pieces):
        _issue(q_ref.at[p, b, kv], q_smem.at[p], q_bars.at[p])

    fetch = functools.partial(_fetch_keys, k_ref, k_smem, k_bars, b, kv, start, block_k, n_pieces)

    for slot in range(stages):
        pl.when(slot < n_all)(functools.partial(fetch, slot, slot))
    for p in range(n_pieces):
        plgpu.barrier_wait(q_bars.at[p])

    def step(j, carry, masked):
        m, l = carry
        slot = lax.rem(j, stages)
        for p in range(n_pieces):
            plgpu.barrier_wait(k_bars.at[slot * n_pieces + p])

        def logits(acc):
            for qp, kp in piece_products(n_pieces):
                plgpu.wgmma(acc, q_smem.at[qp], k_smem.at[slot, kp].transpose((1, 0)))
            return acc[...]

        s = pl.run_scoped(logits, plgpu.ACC((rows, block_k), jnp.float32))   # [rows, bk]
        # The tensor cores are done with this slot (reading `acc` waited for them): refill it.
        pl.when(j + stages < n_all)(functools.partial(fetch, j + stages, slot))
        if masked:
            # Row i is window query r = i % padded (pad rows r >= w act as the last one) at position
            # L - w + r; it sees keys up to there.
            row = plgpu.broadcasted_iota(jnp.int32, (rows, block_k), 0, layout=plgpu.Layout.WGMMA)
            key = plgpu.broadcasted_iota(jnp.int32, (rows, block_k), 1, layout=plgpu.Layout.WGMMA)
            last_seen = length - window + jnp.minimum(lax.rem(row, padded), window - 1)
            s = jnp.where(start + j * block_k + key <= last_seen, s, MASK)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp2(s * scale - lax.broadcast_in_dim(seen_max(m_new) * scale, s.shape, (0,)))
        return m_new, l * jnp.exp2((m - m_new) * scale) + jnp.sum(p, axis=1)

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    init = (plgpu.layout_cast(jnp.full((rows,), MASK, jnp.float32), row_layout),
            plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), row_layout))
    carry = lax.fori_loop(0, n_bulk, functools.partial(step, masked=False), init)
    m, l = lax.fori_loop(n_bulk, n_all, functools.partial(step, masked=True), carry)
    ml_smem.at[0][...] = m
    ml_smem.at[1][...] = l
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(ml_smem, ml_ref.at[b, kv, split])
    plgpu.wait_smem_to_gmem(0)


def _scores_kernel(len_ref, q_ref, lse_ref, k_ref, o_ref, q_smem, lse_smem, k_smem, o_smem, q_bars,
                   lse_bars, k_bars, *, window, padded, group, rows, block_k, chunk, stages, n_pieces,
                   scale):
    """Pass 2, one program per (row, KV head, key chunk): for each prefix key of the chunk and each
    query head g of the group, the sum over g's window rows of exp2(k . q * scale - lse); zeros past
    the prefix. Logits are [keys, rows] here, so each head's sum runs along a row."""
    # len_ref [B]; q_ref [P, B, K, rows, D]; lse_ref [B, K, rows] (base 2, scaled; +huge on pad rows);
    # k_ref [P, B, K, T', D]; o_ref [B, K, G, splits * chunk]
    # q_smem [P, rows, D]; lse_smem [rows]; k_smem [stages, P, bk, D]; o_smem [2, G, bk]
    b, kv, split = lax.axis_index("b"), lax.axis_index("k"), lax.axis_index("s")
    prefix = len_ref[b] - window
    start = split * chunk
    n_blocks = chunk // block_k
    n_bulk = jnp.clip(lax.div(prefix - start, block_k), 0, n_blocks)
    n_live = jnp.clip(lax.div(prefix - start + block_k - 1, block_k), 0, n_blocks)

    @pl.when(n_live > 0)
    def _():
        for p in range(n_pieces):
            _issue(q_ref.at[p, b, kv], q_smem.at[p], q_bars.at[p])
        _issue(lse_ref.at[b, kv], lse_smem, lse_bars.at[0])

    fetch = functools.partial(_fetch_keys, k_ref, k_smem, k_bars, b, kv, start, block_k, n_pieces)

    for slot in range(stages):
        pl.when(slot < n_live)(functools.partial(fetch, n_live - 1 - slot, slot))

    def store(j, n, sums):
        """Writes block j's scores ([bk] per head), the program's n-th store, through the output slot
        n % 2, once the copy that last read that slot (two stores ago) is done reading."""
        out = lax.rem(n, 2)
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        for g in range(group):
            o_smem.at[out, g][...] = sums[g]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[out], o_ref.at[b, kv, :, pl.ds(start + j * block_k, block_k)])

    def step(i, lse, masked):
        # Step i reads block n_live - 1 - i: the chunk backwards, so the blocks pass 1 read last (still
        # in L2 when this pass starts) come first.
        j, slot = n_live - 1 - i, lax.rem(i, stages)
        for p in range(n_pieces):
            plgpu.barrier_wait(k_bars.at[slot * n_pieces + p])

        def logits(acc):
            for qp, kp in piece_products(n_pieces):
                plgpu.wgmma(acc, k_smem.at[slot, kp], q_smem.at[qp].transpose((1, 0)))
            return acc[...]

        s = pl.run_scoped(logits, plgpu.ACC((block_k, rows), jnp.float32))   # [bk, rows]
        pl.when(i + stages < n_live)(functools.partial(fetch, j - stages, slot))
        p = jnp.exp2(s * scale - lax.broadcast_in_dim(lse, s.shape, (1,)))
        if masked:
            key = plgpu.broadcasted_iota(jnp.int32, (block_k, rows), 0, layout=plgpu.Layout.WGMMA)
            p = jnp.where(start + j * block_k + key < prefix, p, 0.0)
        store(j, i, [jnp.sum(p[:, g * padded:(g + 1) * padded], axis=1) for g in range(group)])
        return lse

    def dead(j, carry):
        zeros = plgpu.layout_cast(jnp.zeros((block_k,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        store(j, j, [zeros] * group)   # stores n_live, n_live + 1, ... after the live ones
        return carry

    def live():
        for p in range(n_pieces):
            plgpu.barrier_wait(q_bars.at[p])
        plgpu.barrier_wait(lse_bars.at[0])
        lse = load(lse_smem, plgpu.Layout.WGMMA.reduce(0))                    # [rows], along columns
        lse = lax.fori_loop(0, n_live - n_bulk, functools.partial(step, masked=True), lse)
        lax.fori_loop(n_live - n_bulk, n_live, functools.partial(step, masked=False), lse)

    pl.when(n_live > 0)(live)
    lax.fori_loop(n_live, n_blocks, dead, 0)
    plgpu.wait_smem_to_gmem(0)


def tile_rows(group: int, window: int) -> tuple[int, int]:
    """(padded, rows): a head's window rows padded to whole 8-row layout tiles, and the group's query
    tile padded to a multiple of 64 (wgmma's M)."""
    padded = round_up(window, 8)
    return padded, round_up(group * padded, 64)


def unsupported(group: int, window: int, head_dim: int, dtype, block_k: int = 64, stages: int = 2) -> str | None:
    """Why `window_scores` cannot take this shape class, or None when it can."""
    _, rows = tile_rows(group, window)
    if rows > _MAX_ROWS:
        return (f"the Mosaic window-score kernel takes at most {_MAX_ROWS} query rows per KV group, got "
                f"G={group} x w={window} ({rows} rows padded)")
    n_pieces = 3 if jnp.dtype(dtype) == jnp.float32 else 1
    smem = 2 * head_dim * n_pieces * (rows + stages * block_k) + 4 * rows * 3 + 8 * group * block_k
    if smem > _SMEM_BYTES:
        return (f"the Mosaic window-score tiles need {smem} bytes of shared memory (> {_SMEM_BYTES}) for "
                f"{jnp.dtype(dtype).name} with {rows} rows of head_dim {head_dim}")
    return None


def plan(batch: int, kv_heads: int, tokens: int, block_k: int, programs: int) -> tuple[int, int]:
    """(chunk, splits): keys per program (a multiple of block_k) for about `programs` programs."""
    per_program = max(1, cdiv(cdiv(tokens, block_k) * batch * kv_heads, programs))
    chunk = per_program * block_k
    return chunk, cdiv(tokens, chunk)


@functools.partial(jax.jit, static_argnames=("block_k", "programs", "stages", "interpret"))
def window_scores(q_window: jax.Array, keys: jax.Array, lengths: jax.Array, *, block_k: int = 64,
                  programs: int = _TARGET_PROGRAMS, stages: int = 2, interpret: bool = False) -> jax.Array:
    """Observation-window scores by the Mosaic GPU kernels; same contract as `window_scores_reference`.

    q_window `[B, H, w, D]`, keys `[B, K, T, D]` (bfloat16 or float32; the queries are cast to the keys'
    dtype), lengths `[B]`. Returns `[B, H, T]` float32. `block_k` keys per step (a multiple of 64),
    `programs` the grid size to aim for, `stages` key blocks in flight per program. `interpret=True` runs
    the kernels in the Mosaic GPU interpreter (CPU; jax >= 0.11). Raises NotImplementedError for shapes
    the kernels do not take (module docstring); head_dim must satisfy `supported_head_dim`.
    """
    b, h, w, d = q_window.shape
    kv_heads, t = keys.shape[1], keys.shape[2]
    group = h // kv_heads
    if block_k % 64:
        raise ValueError(f"block_k must be a multiple of 64, got {block_k}")
    if reason := unsupported(group, w, d, keys.dtype, block_k, stages):
        raise NotImplementedError(reason)
    padded, rows = tile_rows(group, w)
    k_pieces, n_pieces = key_pieces(keys, block_k)                             # [P, B, K, T', D]
    chunk, splits = plan(b, kv_heads, t, block_k, programs)
    scale = math.log2(math.e) / math.sqrt(d)
    lengths = lengths.astype(jnp.int32)

    q = q_window.astype(keys.dtype).reshape(b, kv_heads, group, w, d)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, padded - w), (0, 0))).reshape(b, kv_heads, group * padded, d)
    q_pieces, _ = pieces(jnp.pad(q, ((0, 0), (0, 0), (0, rows - group * padded), (0, 0))))  # [P, B, K, rows, D]

    tiles = smem_transforms(d)
    grid = dict(grid=(b, kv_heads, splits), grid_names=("b", "k", "s"), compiler_params=compiler_params(),
                interpret=interpret_params(interpret))
    q_smem = plgpu.SMEM((n_pieces, rows, d), jnp.bfloat16, transforms=tiles)
    k_smem = plgpu.SMEM((stages, n_pieces, block_k, d), jnp.bfloat16, transforms=tiles)
    common = dict(window=w, padded=padded, rows=rows, block_k=block_k, chunk=chunk, stages=stages,
                  n_pieces=n_pieces, scale=scale)

    ml = plgpu.kernel(
        functools.partial(_lse_kernel, **common),
        out_type=jax.ShapeDtypeStruct((b, kv_heads, splits, 2, rows), jnp.float32),
        scratch_types=[q_smem, k_smem, plgpu.SMEM((2, rows), jnp.float32),
                       plgpu.Barrier(num_barriers=n_pieces), plgpu.Barrier(num_barriers=stages * n_pieces)],
        **grid,
    )(lengths, q_pieces, k_pieces)                                             # [B, K, splits, 2, rows]
    lse = merge_partial_lse(ml[:, :, :, 0], ml[:, :, :, 1], scale, axis=2)     # [B, K, rows]
    # Pad rows (r >= w in a head, and the tile's tail) must add nothing to a head's sum: exp2(. - huge) = 0.
    real = (jnp.arange(rows) % padded < w) & (jnp.arange(rows) < group * padded)
    lse = jnp.where(real, lse, -MASK)

    scores = plgpu.kernel(
        functools.partial(_scores_kernel, group=group, **common),
        out_type=jax.ShapeDtypeStruct((b, kv_heads, group, splits * chunk), jnp.float32),
        scratch_types=[q_smem, plgpu.SMEM((rows,), jnp.float32), k_smem,
                       plgpu.SMEM((2, group, block_k), jnp.float32),
                       plgpu.Barrier(num_barriers=n_pieces), plgpu.Barrier(num_barriers=1),
                       plgpu.Barrier(num_barriers=stages * n_pieces)],
        **grid,
    )(lengths, q_pieces, lse, k_pieces)                                        # [B, K, G, splits * chunk]
    return scores[..., :t].reshape(b, h, t)
