"""The reconstruction pass of KVzip (compression/kvzip.py, arXiv 2505.23416) inside layer-major prefill.

`embed` builds the reconstruction's hidden states `xr [B, N, R, Dm]` (one row of R tokens per context
chunk, laid out by `KVzip.layout`) beside the prompt's; `layer` runs them through one decoder layer once
that layer's context K/V buffers are complete, and scores the layer's context keys:

  for each chunk i (the first peeled: only it has no sink keys in its score):
    RMSNorm, q/k/v at RoPE positions L_b .. L_b + R - 1 (each chunk's reconstruction follows the context);
    attention against the layer's whole context (keys >= L_b masked) and causally against the chunk's
    own reconstruction keys (`attention`), o_proj, MLP: the new hidden states of the chunk;
    `kvzip.chunk_scores` of the chunk's context keys from the chunk's queries.

Alive besides the prefill's own arrays: `xr`, one chunk's activations, the `[B, K, T']` scores. The last
chunk's keys are read as the buffer's last cw slots, with the earlier chunk's keys among them masked out
of its softmax (and scored 0 there, merged by max), so no padded copy of the K/V buffers is made.
Invariants: the prompt's hidden states and K/V are not changed (the reconstruction only reads the
buffers), so prefill's logits equal an uncompressed prefill's; each chunk's reconstruction sees the
context and itself only, never another chunk's reconstruction.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from snapkv_jax.compression import kvzip
from snapkv_jax.config import ModelConfig
from snapkv_jax.models.chunked_attention import _cudnn
from snapkv_jax.models.llama import DecoderLayer, Llama


def embed(params, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array, method: kvzip.KVzip) -> jax.Array:
    """`[B, N, R, Dm]` embedded reconstruction tokens of right-padded `tokens [B, T]` (traceable)."""
    ids = kvzip.reconstruction_tokens(method, tokens, lengths)                   # [B, N, R]
    return Llama(cfg).apply({"params": params}, ids, method=lambda m, t: m.embed(t))


def attention(q, k_ctx, v_ctx, lengths, k_own, v_own, *, sliding_window: int | None, implementation: str):
    """`[B, R, H, D]` attention of a reconstruction chunk: q `[B, R, H, D]` at positions L_b + r against
    the context k_ctx, v_ctx `[B, K, T, D]` (keys < L_b) and its own k_own, v_own `[B, R, K, D]` (causal);
    a sliding window W hides keys at or before position - W. Float32 softmax. "cudnn" (GPU, no sliding
    window): two flash-attention calls (the context with per-row kv_seqlen = L_b, the chunk causal) merged
    by their log-sum-exps; otherwise `jnp`, materialising `[B, H, R, T + R]` logits."""
    b, r, h, d = q.shape
    k_own, v_own = k_own.transpose(0, 2, 1, 3), v_own.transpose(0, 2, 1, 3)     # [B, K, R, D]
    if implementation == "cudnn" and sliding_window is None:
        qh = q.transpose(0, 2, 1, 3)                                              # [B, H, R, D]
        out_c, lse_c = _cudnn(qh, k_ctx, v_ctx, causal=False, kv_seqlen=lengths)
        out_o, lse_o = _cudnn(qh, k_own, v_own, causal=True)
        top = jnp.maximum(lse_c, lse_o)
        w_c, w_o = jnp.exp(lse_c - top), jnp.exp(lse_o - top)                     # [B, H, R]
        out = (out_c.astype(jnp.float32) * w_c[..., None] + out_o.astype(jnp.float32) * w_o[..., None])
        out = (out / (w_c + w_o)[..., None]).astype(q.dtype)
        return out.transpose(0, 2, 1, 3)
    group = h // k_ctx.shape[1]
    keys = jnp.repeat(jnp.concatenate([k_ctx, k_own.astype(k_ctx.dtype)], axis=2), group, axis=1)
    values = jnp.repeat(jnp.concatenate([v_ctx, v_own.astype(v_ctx.dtype)], axis=2), group, axis=1)
    logits = jnp.einsum("brhd,bhsd->bhrs", q, keys, preferred_element_type=jnp.float32) / math.sqrt(d)
    t = k_ctx.shape[2]
    ctx = jnp.broadcast_to(jnp.arange(t)[None, None, :] < lengths[:, None, None], (b, r, t))  # [B, R, T]
    own = jnp.broadcast_to(jnp.arange(r)[None, :] <= jnp.arange(r)[:, None], (b, r, r))      # [B, R, R]
    if sliding_window is not None:
        query_pos = lengths[:, None] + jnp.arange(r)                              # [B, R]
        ctx &= jnp.arange(t)[None, None, :] > query_pos[:, :, None] - sliding_window
        own &= (jnp.arange(r)[:, None] - jnp.arange(r)[None, :] < sliding_window)[None]
    visible = jnp.concatenate([ctx, own], axis=2)[:, None]                        # [B, 1, R, T + R]
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1).astype(values.dtype)
    return jnp.einsum("bhrs,bhsd->brhd", probs, values)


def _forward(m: DecoderLayer, x, lengths, k_ctx, v_ctx, implementation):
    """One reconstruction chunk `x [B, R, Dm]` through the layer -> (new x, q `[B, R, H, D]`, own k, v
    `[B, R, K, D]`, attention input `[B, R, Dm]`)."""
    b, r, _ = x.shape
    normed = m.attn_norm(x)
    q, k, v = m.attn.qkv(normed, lengths[:, None] + jnp.arange(r))
    out = attention(q, k_ctx, v_ctx, lengths, k, v, sliding_window=m.cfg.sliding_window,
                    implementation=implementation)
    x = x + m.attn.o_proj(out.reshape(b, r, -1))
    x = x + m.mlp(m.mlp_norm(x))
    return x, q, k, v, normed


def value_norms(params, cfg: ModelConfig) -> jax.Array:
    """`[H, D, D]` float32 W_O^h W_O^h^T per query head h (its D rows of o_proj), so that
    ||W_O^h v|| = sqrt(v^T M_h v) without forming `[.., Dm]` products (KVzip+)."""
    w = params["attn"]["o_proj"]["kernel"].astype(jnp.float32).reshape(cfg.num_heads, cfg.head_dim, -1)
    return jnp.einsum("hdm,hem->hde", w, w, precision=lax.Precision.HIGHEST)


def layer(params, xr, k_buf, v_buf, lengths, *, cfg: ModelConfig, method: kvzip.KVzip, width: int,
          attention_impl: str):
    """Runs `xr [B, N, R, Dm]` through one layer against its complete context buffers `[B, K, T', D]`.
    Returns (new xr, scores `[B, K, T']` float32 of every context key; meaningless at positions >= L_b)."""
    module = DecoderLayer(cfg)
    b, n, r, _ = xr.shape
    _, cw, _ = method.layout(width)
    t = k_buf.shape[2]
    real_queries = kvzip.reconstruction_queries(method, lengths, width)          # [B, N, R]
    gram = value_norms(params, cfg) if method.normalize else None
    forward = functools.partial(module.apply, {"params": params}, method=_forward)

    def step(i, carry, sinks):
        xr, scores = carry
        x, q, k, v, normed = forward(lax.dynamic_index_in_dim(xr, i, axis=1, keepdims=False), lengths,
                                     k_buf, v_buf, attention_impl)
        start = i * method.chunk
        first = jnp.minimum(start, t - cw)  # the last chunk may end past T': read the last cw slots
        chunk_k = lax.dynamic_slice_in_dim(k_buf, first, cw, axis=2)             # [B, K, cw, D]
        key_pos = first + jnp.arange(cw)
        query_weight = key_weight = None
        if gram is not None:
            query_weight = lax.rsqrt(jnp.sum(jnp.square(normed.astype(jnp.float32)), axis=-1))  # [B, R]
            vh = jnp.repeat(lax.dynamic_slice_in_dim(v_buf, first, cw, axis=2).astype(jnp.float32),
                            cfg.group_size, axis=1)                               # [B, H, cw, D]
            key_weight = jnp.sqrt(jnp.maximum(
                jnp.einsum("bhtd,hde,bhte->bht", vh, gram, vh, precision=lax.Precision.HIGHEST), 0.0))
        chunk_real = (key_pos >= start)[None, :] & (key_pos[None, :] < lengths[:, None])  # [B, cw]
        got = kvzip.chunk_scores(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), chunk_k,
                                 k_buf[:, :, :sinks] if sinks else None, chunk_real,
                                 lax.dynamic_index_in_dim(real_queries, i, axis=1, keepdims=False),
                                 query_weight, key_weight)                        # [B, K, cw]
        # Keys of this chunk are scored only here; the masked ones (another chunk's) got 0.
        old = lax.dynamic_slice_in_dim(scores, first, cw, axis=2)
        scores = lax.dynamic_update_slice_in_dim(scores, jnp.maximum(old, got), first, axis=2)
        return lax.dynamic_update_index_in_dim(xr, x.astype(xr.dtype), i, axis=1), scores

    scores = jnp.zeros((b, cfg.num_kv_heads, t), jnp.float32)
    carry = step(0, (xr, scores), 0)
    if n > 1:
        carry = lax.fori_loop(1, n, lambda i, c: step(i, c, method.sinks), carry)
    return carry
