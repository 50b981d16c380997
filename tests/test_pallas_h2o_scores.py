"""The H2O key-score kernels of each back-end (Pallas Triton, Pallas Mosaic GPU) against their `jnp`
reference, and H2O prefill through the kernel against H2O prefill through the reference. Where each
back-end runs (interpreted on the CPU, compiled on a GPU) is as in test_pallas_window_scores.py; run with
JAX_PLATFORMS=cuda on a GPU machine, the same tests check the compiled kernels."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import snapkv_jax as sk
from snapkv_jax.pallas.h2o_scores import chunk_lse_reference, chunk_scores_reference
from tests.test_pallas_window_scores import BACKENDS, BF16_TOL, F32_TOL, INTERPRET, module, unavailable


def tiling(backend: str):
    if backend == "triton":
        return st.fixed_dictionaries(dict(block_q=st.sampled_from([16, 32]), block_k=st.sampled_from([16, 32])))
    return st.fixed_dictionaries(dict(block_q=st.sampled_from([32, 64]), block_k=st.sampled_from([64, 128]),
                                      stages=st.sampled_from([2, 3])))


@st.composite
def chunk_inputs(draw, backend, head_dim, dtype=jnp.float32):
    """(q [B, H, c, D], keys [B, K, T, D], lengths [B], start, tiling): GQA groups 1-8, a chunk anywhere
    in T (not a multiple of the blocks), ragged lengths ending before, inside or after the chunk."""
    group = draw(st.sampled_from([1, 2, 4, 8]))
    kv_heads = draw(st.integers(1, 2))
    tokens = draw(st.integers(16, 80 if backend == "triton" else 200))
    chunk = draw(st.integers(1, tokens))
    start = draw(st.integers(0, tokens - chunk))
    lengths = draw(st.lists(st.one_of(st.integers(1, tokens), st.just(start + chunk), st.just(start + 1),
                                      st.just(tokens)), min_size=1, max_size=2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = jnp.asarray(2 * rng.standard_normal((len(lengths), group * kv_heads, chunk, head_dim)), dtype)
    keys = jnp.asarray(rng.standard_normal((len(lengths), kv_heads, tokens, head_dim)), dtype)
    return q, keys, jnp.asarray(lengths, jnp.int32), start, draw(tiling(backend))


def check_against_reference(backend, inputs, tol):
    """The kernel equals the reference; a Mosaic shape class outside what it takes raises instead."""
    q, keys, lengths, start, tile = inputs
    kernels = module("h2o_scores", backend)
    lse = chunk_lse_reference(q, keys, start)
    call = lambda: kernels.h2o_chunk_scores(q, keys, lse, lengths, jnp.int32(start), interpret=INTERPRET, **tile)
    if backend == "mosaic" and (reason := kernels.unsupported(q.shape[1] // keys.shape[1], q.shape[3], keys.dtype,
                                                              **tile)):
        with pytest.raises(NotImplementedError, match=re.escape(reason)):
            call()
        return
    got = call()
    assert got.shape == (q.shape[0], q.shape[1], keys.shape[2]) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(chunk_scores_reference(q, keys, lengths, start)), **tol)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=4)
@given(data=st.data())
def test_kernel_matches_reference_float32(backend, head_dim, data):
    check_against_reference(backend, data.draw(chunk_inputs(backend, head_dim)), F32_TOL)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=3)
@given(data=st.data())
def test_kernel_matches_reference_bfloat16(backend, head_dim, data):
    check_against_reference(backend, data.draw(chunk_inputs(backend, head_dim, dtype=jnp.bfloat16)), BF16_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unseen_keys_score_zero_and_are_never_read(backend):
    """Keys after the chunk's last real query are seen by nobody: zero, whatever they hold (NaN)."""
    kernels = module("h2o_scores", backend)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 2, 24, 64)), jnp.float32)
    keys = rng.standard_normal((2, 1, 90, 64)).astype(np.float32)
    lengths, start = jnp.asarray([90, 50], jnp.int32), 40
    lse = chunk_lse_reference(q, jnp.asarray(keys), start)
    clean = np.asarray(chunk_scores_reference(q, jnp.asarray(keys), lengths, start))
    keys[:, :, start + 24:] = np.nan
    keys[1, :, 50:] = np.nan
    tile = dict(block_q=16, block_k=16) if backend == "triton" else dict(block_q=32, block_k=64)
    got = np.asarray(kernels.h2o_chunk_scores(q, jnp.asarray(keys), lse, lengths, start, interpret=INTERPRET, **tile))
    np.testing.assert_allclose(got, clean, **F32_TOL)
    assert not got[0, :, start + 24:].any() and not got[1, :, 50:].any()
    # Each real query's probabilities sum to one: 24 queries in row 0, 10 in row 1.
    np.testing.assert_allclose(got.sum(axis=-1), [[24, 24], [10, 10]], rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sliding_window", [None, 8])
def test_h2o_prefill_through_the_kernel_equals_the_reference(backend, sliding_window):
    """A chunked, ragged, GQA prefill with H2O keeps the same positions and logits on both paths; with a
    sliding window shorter than the prompt the kernel cannot reuse the attention's log-sum-exp."""
    if reason := unavailable(backend):
        pytest.skip(reason)
    if INTERPRET and backend == "mosaic":
        pytest.skip("off GPU prefill runs the Triton kernel (dispatch.py); the Mosaic one is compared above")
    cfg = sk.ModelConfig.tiny(sliding_window=sliding_window)
    params = sk.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (2, 64), dtype=np.int32)
    lengths = np.array([64, 41], np.int32)
    method = sk.H2O(capacity=24, window=4)
    ref_logits, ref = sk.prefill(params, cfg, tokens, lengths, compress=method, chunk=16, snap_impl="xla")
    logits, got = sk.prefill(params, cfg, tokens, lengths, compress=method, chunk=16,
                              snap_impl="pallas" if INTERPRET else backend)
    for layer in range(cfg.num_layers):
        np.testing.assert_array_equal(np.asarray(got.pos[layer]), np.asarray(ref.pos[layer]))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
