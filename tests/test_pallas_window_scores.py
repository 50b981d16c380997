"""The window-score kernels of each back-end (Pallas Triton, Pallas Mosaic GPU) against their `jnp`
reference, and `select` through the kernel against `select` through the reference.

Where each back-end runs: the Triton kernel in interpret mode on the CPU and compiled on a GPU; the Mosaic
GPU kernels compiled on a Hopper (or later) GPU and, on the CPU, in the Mosaic GPU interpreter of jax >= 0.11
(which also simulates their copies and barriers; jax 0.10 has no interpreter rules for them, so they skip
there, as they do on a GPU below compute capability 9.0). Run with JAX_PLATFORMS=cuda on a GPU machine,
the same tests check the compiled kernels."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapkv_jax import SnapKV
from snapkv_jax.pallas import dispatch
from snapkv_jax.pallas.window_scores import window_scores_reference
from snapkv_jax.snapkv import select

# float32: both sides do float32 dots and softmaxes; they differ by rounding order only (the Mosaic kernel
# multiplies bfloat16 pieces of the float32 values whose dropped products are below float32 rounding).
F32_TOL = dict(rtol=1e-5, atol=1e-6)
# bfloat16 inputs: identical bf16 values on both sides and exact products, but the kernel's bf16 dot
# accumulates in its own order (on GPU, the MMA's); 1e-4 relative leaves room for that.
BF16_TOL = dict(rtol=1e-4, atol=1e-5)
INTERPRET = jax.default_backend() != "gpu"
BACKENDS = ("triton", "mosaic")


def unavailable(backend: str) -> str | None:
    """Why `backend`'s kernels cannot run in this process (so its tests skip), or None."""
    if backend == "triton":
        return dispatch._TRITON_MISSING
    if dispatch._MOSAIC_MISSING:
        return dispatch._MOSAIC_MISSING
    capability = dispatch.gpu_capability()
    if capability is not None and capability < dispatch.MOSAIC_CAPABILITY:
        return f"Mosaic GPU kernels need compute capability >= 9.0; this GPU is {capability[0]}.{capability[1]}"
    from jax.experimental.pallas import mosaic_gpu
    if capability is None and not hasattr(mosaic_gpu, "InterpretGPUParams"):
        return f"jax {jax.__version__} has no Mosaic GPU interpreter for the CPU (jax >= 0.11 has)"
    return None


def module(kernel: str, backend: str):
    """The kernel module of `backend`, or a skip saying why it cannot run here."""
    if reason := unavailable(backend):
        pytest.skip(reason)
    return dispatch._module(kernel, backend)


def tiling(backend: str):
    """Tiling kwargs each back-end's wrapper takes, drawn to cover its loops' edges."""
    if backend == "triton":
        return st.fixed_dictionaries(dict(block_k=st.sampled_from([None, 16, 32]),
                                          programs=st.sampled_from([1, 3, 1024])))
    return st.fixed_dictionaries(dict(block_k=st.sampled_from([64, 128]), programs=st.sampled_from([1, 3, 1024]),
                                      stages=st.sampled_from([2, 3])))


@st.composite
def kernel_inputs(draw, backend, dtype=jnp.float32):
    """(q [B, H, w, D], keys [B, K, T, D], lengths [B], tiling kwargs) with T <= 300 and ragged lengths:
    shorter than one key block, shorter than the window, T not a multiple of the block."""
    group = draw(st.sampled_from([1, 3, 4, 8]))
    kv_heads = draw(st.integers(1, 2))
    window = draw(st.sampled_from([1, 4, 7, 16, 32]))
    head_dim = draw(st.sampled_from([64, 128]))
    tokens = draw(st.integers(max(window, 16), 300))
    lengths = draw(st.lists(st.one_of(st.integers(1, min(tokens, 40)), st.integers(1, tokens),
                                      st.just(tokens)), min_size=1, max_size=2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = jnp.asarray(2 * rng.standard_normal((len(lengths), group * kv_heads, window, head_dim)), dtype)
    keys = jnp.asarray(rng.standard_normal((len(lengths), kv_heads, tokens, head_dim)), dtype)
    return q, keys, jnp.asarray(lengths, jnp.int32), draw(tiling(backend))


def check_against_reference(backend, inputs, tol):
    """The kernel equals the reference; a Mosaic shape class outside what it takes raises instead
    (NotImplementedError, which dispatch.py turns into a fallback)."""
    q, keys, lengths, tile = inputs
    kernels = module("window_scores", backend)
    if backend == "mosaic" and (reason := kernels.unsupported(q.shape[1] // keys.shape[1], q.shape[2],
                                                              q.shape[3], keys.dtype, tile["block_k"],
                                                              tile["stages"])):
        with pytest.raises(NotImplementedError, match=re.escape(reason)):
            kernels.window_scores(q, keys, lengths, interpret=INTERPRET, **tile)
        return
    got = kernels.window_scores(q, keys, lengths, interpret=INTERPRET, **tile)
    assert got.shape == (q.shape[0], q.shape[1], keys.shape[2]) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(window_scores_reference(q, keys, lengths)), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10)
@given(data=st.data())
def test_kernel_matches_reference_float32(backend, data):
    check_against_reference(backend, data.draw(kernel_inputs(backend)), F32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=6)
@given(data=st.data())
def test_kernel_matches_reference_bfloat16(backend, data):
    check_against_reference(backend, data.draw(kernel_inputs(backend, dtype=jnp.bfloat16)), BF16_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_keys_past_length_are_never_read(backend, dtype):
    kernels = module("window_scores", backend)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 4, 8, 64)), dtype)
    keys = rng.standard_normal((2, 2, 200, 64)).astype(np.float32)
    lengths = jnp.asarray([37, 200], jnp.int32)
    clean = window_scores_reference(q, jnp.asarray(keys, dtype), lengths)
    keys[0, :, 37:] = np.nan
    got = np.asarray(kernels.window_scores(q, jnp.asarray(keys, dtype), lengths, interpret=INTERPRET))
    np.testing.assert_allclose(got, np.asarray(clean), **(F32_TOL if dtype == jnp.float32 else BF16_TOL))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group, window, head_dim, tokens, lengths, programs, dtype", [
    (1, 1, 64, 200, [200, 26, 170], 1024, jnp.float32),
    (1, 1, 64, 256, [256, 64, 129, 5], 1, jnp.float32),
    (8, 32, 128, 300, [300, 40, 77], 1024, jnp.bfloat16)])
def test_edge_layouts_that_failed_on_a_gpu(backend, group, window, head_dim, tokens, lengths, programs, dtype):
    """Layouts that the compiled Mosaic kernel got wrong on an H200 (2026-12-03) while the CPU interpreter
    got them right: T not a multiple of the key block (a full row's last block reaches past T) and one
    program per row whose chunk is longer than T (zeros in other rows: copies past the end of the keys
    and scores); window rows that see no key of a chunk (the third row's second chunk: NaN)."""
    kernels = module("window_scores", backend)
    rng = np.random.default_rng(0)
    q = jnp.asarray(2 * rng.standard_normal((len(lengths), group, window, head_dim)), dtype)
    keys = jnp.asarray(rng.standard_normal((len(lengths), 1, tokens, head_dim)), dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    got = kernels.window_scores(q, keys, lengths, programs=programs, interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(got), np.asarray(window_scores_reference(q, keys, lengths)),
                               **(F32_TOL if dtype == jnp.float32 else BF16_TOL))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_are_zero_outside_the_prefix(backend):
    kernels = module("window_scores", backend)
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((3, 2, 8, 64)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((3, 1, 50, 64)), jnp.float32)
    got = np.asarray(kernels.window_scores(q, keys, jnp.asarray([50, 20, 5], jnp.int32), interpret=INTERPRET))
    assert (got[0, :, :42] > 0).all() and not got[0, :, 42:].any()
    assert not got[1, :, 12:].any() and not got[2].any()
    # Each window query's probabilities sum to one over the keys it sees, so the prefix holds < w.
    assert (got.sum(axis=-1) < 8).all()


def test_mosaic_kernels_pass_the_interpreters_race_detector():
    """Every shared-memory read waits for the copy that fills it, and no copy overwrites a buffer still
    being read (one barrier per in-flight copy): the interpreter's happy-before race detector finds no
    race over several chunks per program, three stages and ragged rows."""
    kernels = module("window_scores", "mosaic")
    if not INTERPRET:
        pytest.skip("the race detector is part of the CPU interpreter")
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    from jax.experimental.pallas import mosaic_gpu
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((2, 8, 32, 64)), jnp.bfloat16)
    keys = jnp.asarray(rng.standard_normal((2, 2, 640, 64)), jnp.bfloat16)
    lengths = jnp.asarray([640, 300], jnp.int32)
    params = mosaic_gpu.InterpretGPUParams(detect_races=True)
    got = kernels.window_scores(q, keys, lengths, programs=8, stages=3, interpret=params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(window_scores_reference(q, keys, lengths)), **BF16_TOL)
    assert not interpret_pallas_call.get_races().races_found


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=4)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(1, 1), (4, 2), (3, 1)]), st.sampled_from([1, 16]))
def test_select_kernel_equals_xla_without_ties(backend, seed, heads, window):
    if reason := unavailable(backend):
        pytest.skip(reason)
    if INTERPRET and backend == "mosaic":
        pytest.skip("off GPU `select` runs the Triton kernel (dispatch.py); the Mosaic one is compared above")
    rng = np.random.default_rng(seed)
    group, kv_heads = heads
    snap = SnapKV(window=window, capacity=window + 24, pooling="none")
    lengths = np.asarray([200, snap.capacity + 1, rng.integers(1, 200)], np.int32)
    q = jnp.asarray(2 * rng.standard_normal((3, group * kv_heads, window, 64)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((3, kv_heads, 200, 64)), jnp.float32)
    via_kernel = select(q, keys, jnp.asarray(lengths), snap, impl="pallas" if INTERPRET else backend)
    via_xla = select(q, keys, jnp.asarray(lengths), snap, impl="xla")
    np.testing.assert_array_equal(np.asarray(via_kernel), np.asarray(via_xla))
