"""Chunked causal attention (`snapkv_jax.models.chunked_attention`): chunk by chunk against the key
buffers equals one causal softmax over the whole sequence (float64 NumPy oracle), with GQA and sliding
windows; on a GPU, the cuDNN path (two flash calls and a log-sum-exp merge) equals the `jnp` reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snapkv_jax.models.chunked_attention import chunk_attention, chunk_attention_reference


def oracle(q, k, v, window=None):
    """q `[c, H, D]` at positions 0.., k, v `[K, T, D]` -> `[T, H, D]` float64, one query at a time."""
    t, h, d = q.shape
    group = h // k.shape[0]
    out = np.zeros((t, h, d))
    for p in range(t):
        lo = 0 if window is None else max(0, p - window + 1)
        for head in range(h):
            logits = k[head // group, lo:p + 1] @ q[p, head] / math.sqrt(d)
            w = np.exp(logits - logits.max())
            out[p, head] = (w / w.sum()) @ v[head // group, lo:p + 1]
    return out


def chunked(q, k, v, chunk, **kwargs):
    """Runs `chunk_attention` over q `[1, T, H, D]` chunk by chunk, traced starts after the first."""
    run = jax.jit(lambda qc, start: chunk_attention(qc, k, v, start, **kwargs))
    with jax.default_matmul_precision("float32"):  # GPUs default to TF32 for float32 dots
        parts = [chunk_attention(q[:, :chunk], k, v, 0, **kwargs)]
        parts += [run(q[:, s:s + chunk], jnp.int32(s)) for s in range(chunk, q.shape[1], chunk)]
    return jnp.concatenate(parts, axis=1)


@pytest.mark.parametrize("heads, kv_heads, window", [(4, 4, None), (8, 2, None), (6, 3, 5), (4, 1, 12)])
def test_reference_chunks_equal_the_oracle(heads, kv_heads, window):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    t, d, chunk = 40, 16, 8
    q = rng.standard_normal((1, t, heads, d)).astype(np.float32)
    k = rng.standard_normal((1, kv_heads, t, d)).astype(np.float32)
    v = rng.standard_normal((1, kv_heads, t, d)).astype(np.float32)
    got = chunked(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), chunk, sliding_window=window,
                  implementation="xla")
    np.testing.assert_allclose(got[0], oracle(q[0].astype(np.float64), k[0].astype(np.float64),
                                              v[0].astype(np.float64), window), atol=2e-5)


def test_reference_ignores_buffer_slots_past_the_chunk():
    """Slots beyond the chunk's last position may hold anything (later chunks are not written yet)."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 8, 2, 16)), jnp.float32)
    k = rng.standard_normal((1, 2, 32, 16)).astype(np.float32)
    v = rng.standard_normal((1, 2, 32, 16)).astype(np.float32)
    loud_k, loud_v = k.copy(), v.copy()
    loud_k[:, :, 16:], loud_v[:, :, 16:] = 100.0, -100.0
    a = chunk_attention_reference(q, jnp.asarray(k), jnp.asarray(v), 8)
    b = chunk_attention_reference(q, jnp.asarray(loud_k), jnp.asarray(loud_v), 8)
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("heads, kv_heads, window", [(32, 32, None), (32, 8, None), (32, 8, 300)])
def test_cudnn_path_equals_the_reference(heads, kv_heads, window):
    t, d, chunk = 1024, 128, 256
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (1, t, heads, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, kv_heads, t, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, kv_heads, t, d), jnp.bfloat16)
    fast = chunked(q, k, v, chunk, sliding_window=window, implementation="cudnn")
    ref = chunked(q, k, v, chunk, sliding_window=window, implementation="xla")
    np.testing.assert_allclose(np.asarray(fast, np.float32), np.asarray(ref, np.float32), atol=2e-2)
