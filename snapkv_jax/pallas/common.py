"""What the Pallas kernels share: the finite mask value, an IEEE-exact `q . k^T` dot, the Triton compiler
params across jax versions, ceiling division and the head dims the kernels take. Importing this module
needs no kernel back-end (the Triton one is imported where its params are built), so a JAX without one
still imports the package and falls back (dispatch.py)."""

from __future__ import annotations

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


def supported_head_dim(head_dim: int) -> bool:
    """Whether the Triton kernels take this head_dim (a power of two >= 16, for their dots and loads)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0
