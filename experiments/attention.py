"""Per-layer attention probes on the real model: queries and keys of every layer of a full causal pass,
and the SnapKV paper's section 3 measurement on them (arXiv 2404.14469).

The probe runs the library's own layer (`DecoderLayer.prompt`: RMSNorm, q/k/v, RoPE, attention, MLP)
one layer at a time, one compiled program for every layer (the layer's params are an argument), so the
q/k it sees are exactly those prefill and decode compute. With the full cache, the attention a generated
token pays during decoding equals the causal attention of the same position in one pass over
prompt + generated tokens, which is what `hit_rates` measures on.
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp

from snapkv_jax.models.llama import DecoderLayer, Llama


@functools.partial(jax.jit, static_argnames=("cfg",))
def _embed(params, tokens, *, cfg):
    return Llama(cfg).apply({"params": params}, tokens, method=lambda m, t: m.embed(t))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _layer(layer_params, x, *, cfg):
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])           # [B, T]
    precision = "float32" if x.dtype == jnp.float32 else None  # as the library: no TF32 for float32 params
    with jax.default_matmul_precision(precision):
        x, q, k, _ = DecoderLayer(cfg).apply({"params": layer_params}, x, positions, method=DecoderLayer.prompt)
    return x, q, k


def layers_qk(params, cfg, tokens) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Yields, layer by layer, (q `[B, T, H, D]`, k `[B, T, K, D]`) after RoPE of a causal pass over
    right-padded `tokens [B, T]` (padding sits after every real position, so it changes none of them)."""
    x = _embed(params, jnp.asarray(tokens), cfg=cfg)                             # [B, T, Dm]
    for layer in range(cfg.num_layers):
        x, q, k = _layer(params[f"layers_{layer}"], x, cfg=cfg)
        yield q, k


@functools.partial(jax.jit, static_argnames=("window", "offsets", "generated", "top"))
def hit_rates(q, k, lengths, *, window: int, offsets: tuple[int, ...], generated: int, top: int) -> jax.Array:
    """`[B, H, O]`: for each row, query head and window offset o, the share of the `top` prefix positions
    that generation-time attention ranks highest which the observation window ending o tokens before the
    prompt's end ranks highest too (the hit rate of arXiv 2404.14469 section 3).

    q `[B, T, H, D]`, k `[B, T, K, D]` of a pass over prompt + generated tokens; lengths `[B]` prompt
    lengths L; the `generated` tokens sit at L .. L+generated-1. Candidates are the prefix positions
    j < L - window (what SnapKV chooses from), the same for every offset. Generation scores: each
    candidate's softmax probability summed over the generated tokens' queries. Window scores: summed over
    the `window` queries at L-o-window .. L-o-1 (a window sees only keys up to its own position). Needs
    top <= L - window for every row.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    starts = [lengths] + [lengths - o - window for o in offsets]                 # query blocks
    sizes = [generated] + [window] * len(offsets)
    qpos = jnp.concatenate([s[:, None] + jnp.arange(n) for s, n in zip(starts, sizes)], axis=1)   # [B, Q]
    qs = jnp.take_along_axis(q, qpos[:, :, None, None], axis=1)                  # [B, Q, H, D]
    qs = qs.reshape(b, -1, kv, g, d)                                             # [B, Q, K, G, D]
    logits = jnp.einsum("bqkgd,btkd->bkgqt", qs, k, preferred_element_type=jnp.float32) / jnp.sqrt(d)
    visible = jnp.arange(t)[None, None, :] <= qpos[:, :, None]                   # [B, Q, T]
    probs = jax.nn.softmax(jnp.where(visible[:, None, None], logits, -jnp.inf), axis=-1)
    probs = probs.reshape(b, h, -1, t)                                           # [B, H, Q, T]
    gen = probs[:, :, :generated].sum(2)                                         # [B, H, T]
    win = probs[:, :, generated:].reshape(b, h, len(offsets), window, t).sum(3)  # [B, H, O, T]
    candidate = jnp.arange(t)[None, :] < (lengths - window)[:, None]             # [B, T]
    gen_top = jax.lax.top_k(jnp.where(candidate[:, None], gen, -jnp.inf), top)[1]                 # [B, H, top]
    win_top = jax.lax.top_k(jnp.where(candidate[:, None, None], win, -jnp.inf), top)[1]           # [B, H, O, top]
    chosen = jnp.zeros((b, h, t), bool).at[jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None],
                                           gen_top].set(True)                    # [B, H, T]
    hits = jnp.take_along_axis(chosen[:, :, None, :], win_top, axis=-1).sum(-1)  # [B, H, O]
    return hits / top
