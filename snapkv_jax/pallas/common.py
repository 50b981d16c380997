"""What the Pallas kernels share: the finite mask value, an IEEE-exact `q . k^T` dot, the Triton compiler
params across jax versions, H2O's query-block ranges, the online max of a row that has seen nothing, the
merge of per-chunk log-sum-exps, the bfloat16 split of float32 operands, ceiling division and the head dims
the kernels take. Importing this module needs no kernel back-end (the Triton one is imported where its
params are built), so a JAX without one still imports the package and falls back (dispatch.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Finite, so exp2(MASK - MASK) = 1 never becomes NaN in an online max (as in jax's Pallas attention).
MASK = -0.7 * float(np.finfo(np.float32).max)


def dot_nt(a, b):
    """a [m, D] . b [n, D]^T -> [m, n] float32. HIGHEST keeps float32 inputs off TF32 (the Triton
    lowering's default for float32); bfloat16 inputs take the bf16 MMA either way."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def compiler_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as plgpu
    # The Triton params class is `CompilerParams` in jax >= 0.7 and `TritonCompilerParams` before.
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def query_block_ranges(first_key, block_k: int, start, limit, block_q: int):
    """H2O kernels' query blocks for one key block starting at `first_key`, over a chunk whose queries
    hold positions start, start + 1, ... (real below `limit`), in blocks of `block_q`. Returns
    (live_lo, a_end, b_end, live_hi): blocks [live_lo, live_hi) see some key of the block; inside
    [a_end, b_end) every query sees every key of the block and is real, so no mask is needed there, and
    [live_lo, a_end) and [b_end, live_hi) are masked."""
    # Query block i matters when it ends at or after the first key and begins below the limit.
    live_lo = lax.div(jnp.maximum(first_key - start, 0), block_q)
    live_hi = lax.div(jnp.maximum(limit - start, 0) + block_q - 1, block_q)
    bulk_lo = lax.div(jnp.maximum(first_key + block_k - 1 - start, 0) + block_q - 1, block_q)
    bulk_hi = lax.div(jnp.maximum(limit - start, 0), block_q)
    a_end = jnp.clip(bulk_lo, live_lo, jnp.maximum(live_lo, live_hi))
    b_end = jnp.clip(bulk_hi, a_end, jnp.maximum(a_end, live_hi))
    return live_lo, a_end, b_end, live_hi


def seen_max(m: jax.Array) -> jax.Array:
    """The running row max to subtract in an online softmax's exp2: m itself, or 0 for a row that has
    seen no key yet (m = MASK), so that its masked logits give exp2(MASK * scale) = 0 and its l stays 0.
    Subtracting MASK * scale from MASK * scale would be 0 only if both products rounded alike; once the
    compiler fuses one multiply into an FMA they do not, and on an H200 the Mosaic kernel got an infinite
    l for such a row, then NaN in `merge_partial_lse`."""
    return jnp.where(m > MASK, m, 0.0)


def merge_partial_lse(m: jax.Array, l: jax.Array, scale: float, axis: int) -> jax.Array:
    """Base-2 log-sum-exp of the scaled logits from per-chunk partials along `axis`: m the chunk's max
    raw logit (MASK where it saw none), l = sum exp2((logit - m) * scale). Rows that see no key at all
    exist only when L < w, whose prefix is empty; they get 0, so nothing downstream overflows."""
    top = jnp.max(m, axis=axis)
    total = jnp.sum(l * jnp.exp2((m - jnp.expand_dims(top, axis)) * scale), axis=axis)
    seen = top > MASK
    return jnp.where(seen, top * scale + jnp.log2(jnp.where(seen, total, 1.0)), 0.0)


def _bfloat16_part(x: jax.Array) -> jax.Array:
    """float32 `x` truncated to its leading 8 significant bits (a bfloat16 value, still float32). Done on
    the bits: XLA on GPU may drop a float32 -> bfloat16 -> float32 round trip as excess precision
    (its SimplifyFPConversions pass), which turned an `astype` split into hi = x, mid = lo = 0."""
    bits = lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFF0000)
    return lax.bitcast_convert_type(bits, jnp.float32)


def split_bfloat16(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 `x` as bfloat16 (hi, mid, lo) with hi + mid + lo == x up to 2^-22 relative: each piece
    holds the next 8 significant bits, so products of pieces are exact in float32."""
    hi = _bfloat16_part(x)
    rest = x - hi                                   # exact: x and hi share their leading bits
    mid = _bfloat16_part(rest)
    lo = _bfloat16_part(rest - mid)
    return tuple(part.astype(jnp.bfloat16) for part in (hi, mid, lo))  # exact: each is a bfloat16 value


def supported_head_dim(head_dim: int) -> bool:
    """Whether the Triton kernels take this head_dim (a power of two >= 16, for their dots and loads)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0
