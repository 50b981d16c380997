"""The Pallas window-score kernel against its `jnp` reference, and `select` through the kernel against
`select` through the reference. On CPU the kernel runs in interpret mode; run with JAX_PLATFORMS=cuda on a
GPU machine, the same tests check the compiled Triton kernel."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from snapkv_jax import SnapKV
from snapkv_jax.pallas.window_scores import window_scores_reference
from snapkv_jax.pallas.window_scores_triton import window_scores
from snapkv_jax.snapkv import select

# float32: both sides do float32 dots and softmaxes; they differ by rounding order only.
F32_TOL = dict(rtol=1e-5, atol=1e-6)
# bfloat16 inputs: identical bf16 values on both sides and exact products, but the kernel's bf16 dot
# accumulates in its own order (on GPU, the MMA's); 1e-4 relative leaves room for that.
BF16_TOL = dict(rtol=1e-4, atol=1e-5)
INTERPRET = jax.default_backend() != "gpu"


@st.composite
def kernel_inputs(draw, dtype=jnp.float32):
    """(q [B, H, w, D], keys [B, K, T, D], lengths [B], tiling kwargs) with T <= 300 and ragged lengths:
    shorter than one key block, shorter than the window, T not a multiple of the block."""
    group = draw(st.sampled_from([1, 3, 4, 8]))
    kv_heads = draw(st.integers(1, 2))
    window = draw(st.sampled_from([1, 4, 7, 16, 32]))
    head_dim = draw(st.sampled_from([64, 128]))
    tokens = draw(st.integers(max(window, 16), 300))
    lengths = draw(st.lists(st.one_of(st.integers(1, min(tokens, 40)), st.integers(1, tokens),
                                      st.just(tokens)), min_size=1, max_size=2))
    tiling = dict(block_k=draw(st.sampled_from([None, 16, 32])), programs=draw(st.sampled_from([1, 3, 1024])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = jnp.asarray(2 * rng.standard_normal((len(lengths), group * kv_heads, window, head_dim)), dtype)
    keys = jnp.asarray(rng.standard_normal((len(lengths), kv_heads, tokens, head_dim)), dtype)
    return q, keys, jnp.asarray(lengths, jnp.int32), tiling


@settings(max_examples=14)
@given(kernel_inputs())
def test_kernel_matches_reference_float32(inputs):
    q, keys, lengths, tiling = inputs
    got = window_scores(q, keys, lengths, interpret=INTERPRET, **tiling)
    assert got.shape == (q.shape[0], q.shape[1], keys.shape[2]) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(window_scores_reference(q, keys, lengths)),
                               **F32_TOL)


@settings(max_examples=6)
@given(kernel_inputs(dtype=jnp.bfloat16))
def test_kernel_matches_reference_bfloat16(inputs):
    q, keys, lengths, tiling = inputs
    got = window_scores(q, keys, lengths, interpret=INTERPRET, **tiling)
    np.testing.assert_allclose(np.asarray(got), np.asarray(window_scores_reference(q, keys, lengths)),
                               **BF16_TOL)


def test_keys_past_length_are_never_read():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 4, 8, 64)), jnp.float32)
    keys = rng.standard_normal((2, 2, 100, 64)).astype(np.float32)
    lengths = jnp.asarray([37, 100], jnp.int32)
    clean = window_scores_reference(q, jnp.asarray(keys), lengths)
    keys[0, :, 37:] = np.nan
    got = np.asarray(window_scores(q, jnp.asarray(keys), lengths, block_k=16, interpret=INTERPRET))
    np.testing.assert_allclose(got, np.asarray(clean), **F32_TOL)


def test_scores_are_zero_outside_the_prefix():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((3, 2, 8, 64)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((3, 1, 50, 64)), jnp.float32)
    got = np.asarray(window_scores(q, keys, jnp.asarray([50, 20, 5], jnp.int32), interpret=INTERPRET))
    assert (got[0, :, :42] > 0).all() and not got[0, :, 42:].any()
    assert not got[1, :, 12:].any() and not got[2].any()
    # Each window query's probabilities sum to one over the keys it sees, so the prefix holds < w.
    assert (got.sum(axis=-1) < 8).all()


@settings(max_examples=5)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(1, 1), (4, 2), (3, 1)]), st.sampled_from([1, 16]))
def test_select_pallas_equals_xla_without_ties(seed, heads, window):
    rng = np.random.default_rng(seed)
    group, kv_heads = heads
    snap = SnapKV(window=window, capacity=window + 24, pooling="none")
    lengths = np.asarray([200, snap.capacity + 1, rng.integers(1, 200)], np.int32)
    q = jnp.asarray(2 * rng.standard_normal((3, group * kv_heads, window, 64)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((3, kv_heads, 200, 64)), jnp.float32)
    via_kernel = select(q, keys, jnp.asarray(lengths), snap, impl="pallas")
    via_xla = select(q, keys, jnp.asarray(lengths), snap, impl="xla")
    np.testing.assert_array_equal(np.asarray(via_kernel), np.asarray(via_xla))
