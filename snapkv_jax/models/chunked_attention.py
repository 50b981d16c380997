"""Causal attention of one query chunk against a layer's key/value buffers: the attention step of
layer-major chunked prefill.

Queries `q [B, c, H, D]` sit at positions start .. start+c-1; the buffers `k, v [B, K, T, D]` hold the
layer's keys (after RoPE) and values at every position below start + c (later slots may hold anything).
A query at position p attends to keys j <= p, and with a sliding window W only to j > p - W. Padding
needs no mask: a real query at p < L only sees keys j <= p < L.

Two implementations, same contract (tests/test_chunked_attention.py compares them):
  * `chunk_attention_reference`: plain `jnp`, materialises `[B, H, c, T]` float32 logits. The CPU path,
    and the GPU path for sliding-window models with more than one chunk.
  * the cuDNN path (GPU, bf16/fp16): two flash-attention calls and a merge. The diagonal block (keys
    start .. start+c-1) is an ordinary causal square; the keys below `start` are seen by every query of
    the chunk, so they are one unmasked call over the key buffer with `kv_seqlen = start` (cuDNN skips the
    blocks past it: measured on an H100, time proportional to kv_seqlen, experiments/results/
    probe_gpu_apis.json). Each call returns its float32 log-sum-exp per query, and the two partial
    softmaxes merge exactly: o = (o_a e^lse_a + o_b e^lse_b) / (e^lse_a + e^lse_b). `jax.nn`'s wrapper
    returns the log-sum-exp cast to bf16, too coarse for the merge, so we call the cuDNN entry point it
    wraps (`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`, head-major "BNTH" layout
    so the buffers need no transpose).
The softmax is float32 on every path, as in HF transformers. Both paths can also return each query's
log-sum-exp (after the merge: top + log(e^(lse_a - top) + e^(lse_b - top))), which H2O's key scores
reuse instead of computing it again (pallas/h2o_scores_triton.py); `causal_lse` gives it alone.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def chunk_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, start, *,
                              sliding_window: int | None = None, key_start=0, with_lse: bool = False):
    """`[B, c, H, D]` attention of the chunk; k, v `[B, K, S, D]` hold keys of positions key_start ..
    key_start+S-1 (the whole buffer by default). Float32 softmax; output in v's dtype. `with_lse`: also
    each query's float32 log-sum-exp of its visible logits q.k / sqrt(D), `[B, H, c]`."""
    logits = _reference_logits(q, k, start, sliding_window, key_start)           # [B, H, c, S]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhcs,bhsd->bchd", probs, _per_query_head(v, q.shape[2]))    # [B, c, H, D]
    if not with_lse:
        return out
    return out, jax.nn.logsumexp(logits, axis=-1)


def _per_query_head(x: jax.Array, heads: int) -> jax.Array:
    """`[B, K, S, D]` -> `[B, H, S, D]`: query head h reads KV head h // G. A temporary of the reference
    only (the cache never repeats K/V): XLA's CPU backend runs the flat-head einsums about twice as fast
    as grouped `[B, K, G, ...]` ones (measured: 1.7 vs 3.6 s per SmolLM2 layer at 3838 tokens)."""
    return jnp.repeat(x, heads // x.shape[1], axis=1)


def _reference_logits(q, k, start, sliding_window, key_start=0):
    """`[B, H, c, S]` float32 logits of q `[B, c, H, D]` against k `[B, K, S, D]`, -inf where a key is
    after the query or (with a sliding window W) at or before query - W."""
    c, h, d = q.shape[1:]
    s = k.shape[2]
    logits = jnp.einsum("bchd,bhsd->bhcs", q, _per_query_head(k, h),
                        preferred_element_type=jnp.float32) / math.sqrt(d)
    query_pos = start + jnp.arange(c)[:, None]                                    # [c, 1]
    key_pos = key_start + jnp.arange(s)[None, :]                                  # [1, S]
    visible = key_pos <= query_pos
    if sliding_window is not None:
        visible &= key_pos > query_pos - sliding_window
    return jnp.where(visible, logits, -jnp.inf)


def _sliding_slab_attention(q, k, v, start, sliding_window: int, with_lse: bool = False):
    """The reference over only the keys a sliding window can reach: positions start-W+1 .. start+c-1."""
    c, t = q.shape[1], k.shape[2]
    size = min(t, sliding_window - 1 + c)
    key_start = jnp.clip(start - (sliding_window - 1), 0, t - size)
    k = lax.dynamic_slice_in_dim(k, key_start, size, axis=2)
    v = lax.dynamic_slice_in_dim(v, key_start, size, axis=2)
    return chunk_attention_reference(q, k, v, start, sliding_window=sliding_window, key_start=key_start,
                                     with_lse=with_lse)


def _cudnn(q, k, v, *, causal: bool, kv_seqlen=None, sliding_window=None):
    """cuDNN flash attention, head-major: q `[B, H, c, D]`, k, v `[B, K, S, D]` -> (out `[B, H, c, D]`,
    float32 lse `[B, H, c]`)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa  # see the module docstring
    b, h, c, d = q.shape
    mask = fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK
    seqlens = {}
    if kv_seqlen is not None:
        mask = fa.MaskType.PADDING
        seqlens = dict(q_seqlen=jnp.full((b,), c, jnp.int32),
                       kv_seqlen=jnp.broadcast_to(jnp.asarray(kv_seqlen, jnp.int32), (b,)))
    out, lse = fa.dot_product_attention(q, k, v, **seqlens, scale=1 / math.sqrt(d), mask_type=mask,
                                        qkv_layout="BNTH", sliding_window_length=sliding_window,
                                        return_residual=True)
    return out, lse.reshape(b, h, c).astype(jnp.float32)


def _cudnn_chunk_attention(q, k, v, start, sliding_window):
    """(out `[B, c, H, D]`, float32 lse `[B, H, c]`) of the chunk by cuDNN."""
    c = q.shape[1]
    qh = q.transpose(0, 2, 1, 3)                                                  # [B, H, c, D]
    diag_k = lax.dynamic_slice_in_dim(k, start, c, axis=2)
    diag_v = lax.dynamic_slice_in_dim(v, start, c, axis=2)
    out, lse = _cudnn(qh, diag_k, diag_v, causal=True, sliding_window=sliding_window)
    if not (isinstance(start, int) and start == 0):
        # Keys below `start`: all visible to every query of the chunk (no sliding window on this path).
        out_a, lse_a = _cudnn(qh, k, v, causal=False, kv_seqlen=start)
        lse_a = jnp.where(start > 0, lse_a, -jnp.inf)                             # no keys: weight 0
        top = jnp.maximum(lse, lse_a)
        w_b, w_a = jnp.exp(lse - top), jnp.exp(lse_a - top)                       # [B, H, c]
        merged = (out.astype(jnp.float32) * w_b[..., None]
                  + jnp.where(start > 0, out_a.astype(jnp.float32), 0.0) * w_a[..., None])
        out = (merged / (w_a + w_b)[..., None]).astype(q.dtype)
        lse = top + jnp.log(w_a + w_b)
    return out.transpose(0, 2, 1, 3), lse


def resolve_implementation(implementation: str | None, dtype) -> str:
    """None -> "cudnn" on a GPU for bf16/fp16 inputs, else "xla"; "cudnn" and "xla" stand."""
    if implementation is not None:
        return implementation
    flash = jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
    return "cudnn" if flash else "xla"


def chunk_attention(q: jax.Array, k: jax.Array, v: jax.Array, start, *, sliding_window: int | None,
                    implementation: str, with_lse: bool = False):
    """`[B, c, H, D]` causal attention of the chunk at `start` (a Python int or a traced scalar).

    `implementation`: "cudnn" (GPU flash attention; sliding-window models fall back to the reference
    over the keys the window reaches when start may be > 0) or "xla" (the reference). `with_lse`: return
    (out, lse) with each query's float32 log-sum-exp `[B, H, c]` over the keys it attended to.
    """
    if implementation == "cudnn" and (sliding_window is None or (isinstance(start, int) and start == 0)):
        out, lse = _cudnn_chunk_attention(q, k, v, start, sliding_window)
        return (out, lse) if with_lse else out
    if sliding_window is not None and k.shape[2] > sliding_window - 1 + q.shape[1]:
        return _sliding_slab_attention(q, k, v, start, sliding_window, with_lse)
    return chunk_attention_reference(q, k, v, start, sliding_window=sliding_window, with_lse=with_lse)


def causal_lse(q: jax.Array, k: jax.Array, start, *, implementation: str) -> jax.Array:
    """`[B, H, c]` float32 log-sum-exp of each chunk query's causal logits q.k / sqrt(D) over every key
    j <= its position, no sliding window (what H2O's scores are normalised by, pallas/h2o_scores.py)."""
    if implementation == "cudnn":
        return _cudnn_chunk_attention(q, k, k, start, None)[1]
    return jax.nn.logsumexp(_reference_logits(q, k, start, None), axis=-1)
