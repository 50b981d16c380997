"""Sequence-parallel prefill: the prompt split over the mesh axis `seq`, for prompts one device cannot hold.

Per layer, one jitted program (the layer-major loop of layer_prefill.py is unchanged around it):
  1. `shard_map` over every mesh axis: each device holds T/S consecutive positions of its rows (`data`)
     and its heads (`model`). Ring attention (Liu et al., arXiv 2310.01889): S steps, each attending
     the local queries to the K/V block the device holds and passing the block on to the next device
     (`lax.ppermute`), the blocks combined by an online softmax. o_proj and the MLP are row-parallel, one
     all-reduce (`psum` over `model`) each, as in sharding.py's tensor parallelism.
     What the compression method needs is computed where the keys live: the observation window's
     queries (each position lives on one device: a `psum` over `seq` assembles them), SnapKV-style
     window scores of each device's keys with the softmax normalised across devices (`pmax`/`psum` of
     `[B, H, w]` statistics), and H2O's scores by a second ring pass of the queries with their final
     log-sum-exp.
  2. The method selects on the global view, as on one device (XLA moves the `[B, H, T]` scores, never K/V).
  3. `shard_map` again: each device gathers the kept positions it holds, and a `psum` over `seq`
     assembles the compressed cache on every device of `seq`, split by row and KV head, where decode runs.

Attention here is plain `jnp` (float32 softmax): each ring step materialises `[B, H/M, T/S, T/S]` logits
per device, so this path trades memory for simplicity against the one-device cuDNN path.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from snapkv_jax import cache as kv
from snapkv_jax import sharding
from snapkv_jax.compression import LayerInputs, collect_window
from snapkv_jax.config import ModelConfig
from snapkv_jax.models.llama import DecoderLayer

AXIS = "seq"


def padded_width(width: int, seq: int) -> int:
    """The prompt width rounded up to a multiple of the `seq` axis: T/S positions per device."""
    return -(-width // seq) * seq


def _attend_block(q, k, v, q_pos, k_pos, sliding_window):
    """Unnormalised attention of q `[B, c, H, D]` (positions q_pos `[c]`) to one K/V block `[B, t, K, D]`
    (positions k_pos `[t]`), causal (and windowed): (max logit `[B, K, G, c]`, -inf where a query sees
    nothing; sum `[B, K, G, c]`; acc `[B, K, G, c, D]`), float32, sum and acc relative to the max."""
    b, c, h, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, c, kh, h // kh, d)                                        # [B, c, K, G, D]
    logits = jnp.einsum("bckgd,btkd->bkgct", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    visible = k_pos[None, :] <= q_pos[:, None]                                  # [c, t]
    if sliding_window is not None:
        visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
    logits = jnp.where(visible, logits, -jnp.inf)
    top = jnp.max(logits, axis=-1)
    p = jnp.exp(logits - _finite(top)[..., None])                                # 0 where masked
    acc = jnp.einsum("bkgct,btkd->bkgcd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return top, jnp.sum(p, axis=-1), acc


def _finite(x):
    return jnp.where(jnp.isfinite(x), x, 0.0)


def _ring_attention(q, k, v, positions, cfg: ModelConfig, seq: int):
    """Local queries `[B, c, H, D]` against every device's K/V `[B, c, K, D]` around the ring ->
    (output `[B, c, H*D]` in q's dtype, log-sum-exp `[B, K, G, c]` float32)."""
    me = lax.axis_index(AXIS)
    c = q.shape[1]
    perm = [(i, (i + 1) % seq) for i in range(seq)]

    def step(s, carry):
        k_blk, v_blk, top, total, acc = carry
        origin = (me - s) % seq                                                  # whose block we hold
        t, tot, a = _attend_block(q, k_blk, v_blk, positions, origin * c + jnp.arange(c), cfg.sliding_window)
        new_top = jnp.maximum(top, t)                                            # -inf: nothing seen yet
        base = _finite(new_top)
        old_scale, blk_scale = jnp.exp(top - base), jnp.exp(_finite(t) - base)
        total = total * old_scale + tot * blk_scale
        acc = acc * old_scale[..., None] + a * blk_scale[..., None]
        k_blk, v_blk = lax.ppermute(k_blk, AXIS, perm), lax.ppermute(v_blk, AXIS, perm)
        return k_blk, v_blk, new_top, total, acc

    b, _, h, d = q.shape
    kh = k.shape[2]
    stats = jnp.full((b, kh, h // kh, c), -jnp.inf, jnp.float32)
    init = (k, v, stats, jnp.zeros_like(stats), jnp.zeros((b, kh, h // kh, c, d), jnp.float32))
    _, _, top, total, acc = lax.fori_loop(0, seq, step, init)
    out = (acc / total[..., None]).transpose(0, 3, 1, 2, 4).reshape(b, c, h * d)  # every query sees itself
    return out.astype(q.dtype), top + jnp.log(total)


def _window_attention(q_window, k, lengths, positions):
    """SnapKV step 2 for this device's keys `[B, K, c, D]` (positions `[c]`): `[B, H, c]` float32, the
    window queries' softmax normalised over every device's keys (window_scores_reference's numerics)."""
    b, h, w, d = q_window.shape
    kh = k.shape[1]
    q = q_window.astype(jnp.float32).reshape(b, kh, h // kh, w, d)
    logits = jnp.einsum("bkgwd,bktd->bkgwt", q, k.astype(jnp.float32),
                        precision=lax.Precision.HIGHEST) / math.sqrt(d)          # [B, K, G, w, c]
    query_pos = lengths[:, None, None, None, None] - w + jnp.arange(w)[:, None]  # [B, 1, 1, w, 1]
    visible = positions <= query_pos
    top = lax.pmax(jnp.max(jnp.where(visible, logits, -jnp.inf), axis=-1, keepdims=True), AXIS)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    p = jnp.where(visible, jnp.exp(logits - top), 0.0)
    total = lax.psum(jnp.sum(p, axis=-1, keepdims=True), AXIS)
    p = p / jnp.where(total > 0, total, 1.0)
    scores = jnp.sum(p, axis=3).reshape(b, h, -1)                                # [B, H, c]
    return jnp.where(positions < (lengths - w)[:, None, None], scores, 0.0)


def _query_scores(q, lse, k, lengths, positions, seq: int):
    """H2O's scores of this device's keys `[B, K, c, D]`: the probability every real prompt query
    (passed around the ring with its log-sum-exp `[B, K, G, c]`) pays each key, summed. `[B, H, c]`."""
    me = lax.axis_index(AXIS)
    b, c, h, d = q.shape
    kh = k.shape[1]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
    perm = [(i, (i + 1) % seq) for i in range(seq)]

    def step(s, carry):
        q_blk, lse_blk, scores = carry
        q_pos = ((me - s) % seq) * c + jnp.arange(c)                            # [c]
        qg = q_blk.reshape(b, c, kh, h // kh, d)
        logits = jnp.einsum("bckgd,bktd->bkgct", qg, k.astype(q.dtype), precision=precision,
                            preferred_element_type=jnp.float32) / math.sqrt(d)   # [B, K, G, c_q, c_k]
        visible = (positions[None, :] <= q_pos[:, None])[None, None, None]       # [1, 1, 1, c_q, c_k]
        real = (q_pos[None, :] < lengths[:, None])[:, None, None, :, None]       # [B, 1, 1, c_q, 1]
        p = jnp.where(visible & real, jnp.exp(logits - lse_blk[..., None]), 0.0)
        scores = scores + jnp.sum(p, axis=3).reshape(b, h, c)
        return lax.ppermute(q_blk, AXIS, perm), lax.ppermute(lse_blk, AXIS, perm), scores

    _, _, scores = lax.fori_loop(0, seq, step, (q, lse, jnp.zeros((b, h, c), jnp.float32)))
    return scores


def _local_layer(params, x, lengths, *, cfg_local, window, query_scores, seq, float32, tensor_axis):
    """One device's part of a layer: x `[B, c, Dm]` (positions me*c ..) -> (x, k, v `[B, K, c, D]`,
    q_window `[B, H, w, D]` or None, window scores `[B, H, c]` or None, query scores or None).
    `tensor_axis`: "model", or None when the mesh has no such axis (nothing to all-reduce over)."""
    def reduce(y):
        return y if tensor_axis is None else lax.psum(y, tensor_axis)

    module = DecoderLayer(cfg_local)
    b, c, _ = x.shape
    start = lax.axis_index(AXIS) * c
    positions = start + jnp.arange(c)
    apply = functools.partial(module.apply, {"params": params})
    with jax.default_matmul_precision("float32" if float32 else None):
        q, k, v = apply(x, jnp.broadcast_to(positions, (b, c)), method=lambda m, x, p: m.attn.qkv(m.attn_norm(x), p))
        out, lse = _ring_attention(q, k, v, positions, cfg_local, seq)
        x = x + reduce(apply(out, method=lambda m, o: m.attn.o_proj(o)))
        x = x + reduce(apply(x, method=lambda m, x: m.mlp(m.mlp_norm(x))))
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                 # [B, K, c, D]
        q_window = win_scores = h2o = None
        if window:
            zeros = jnp.zeros((b, q.shape[2], window, q.shape[3]), q.dtype)
            q_window = lax.psum(collect_window(zeros, q, lengths, start), AXIS)
            win_scores = _window_attention(q_window, k, lengths, positions)
        if query_scores:
            h2o = _query_scores(q, lse, k, lengths, positions, seq)
    return x, k, v, q_window, win_scores, h2o


def _gather_local(k, v, idx):
    """This device's share of the kept slots: k, v `[B, K, c, D]` (positions me*c ..), idx `[B, K, S]`
    global positions -> `[B, K, S, D]` summed over `seq` (each kept position lives on one device)."""
    c = k.shape[2]
    local = idx - lax.axis_index(AXIS) * c
    mine = ((idx >= 0) & (local >= 0) & (local < c))[..., None]
    safe = jnp.clip(local, 0, c - 1)[..., None]
    k = jnp.where(mine, jnp.take_along_axis(k, safe, axis=2), 0).astype(k.dtype)
    v = jnp.where(mine, jnp.take_along_axis(v, safe, axis=2), 0).astype(v.dtype)
    return lax.psum(k, AXIS), lax.psum(v, AXIS)


def layer(params, x, lengths, layer_index, *, cfg, compress, plan, impl, attention, mesh):
    """layer_prefill._layer's contract on a mesh with a `seq` axis: x `[B, T', Dm]` (T' = plan.padded,
    split over `seq`) -> (x, k, v `[B, K, W + extra, D]`, pos `[B, K, W + extra]`)."""
    del attention  # the ring path attends in jnp
    seq = sharding.axis_size(mesh, AXIS)
    rows, heads = sharding.spec(mesh, "data"), sharding.spec(mesh, "data", "model", None, None)
    window = compress.observation_window if compress is not None else 0
    wants_h2o = compress is not None and compress.needs_query_scores
    param_specs = jax.tree_util.tree_map(lambda s: s.spec, sharding.param_shardings(params, mesh))
    seq_scores = sharding.spec(mesh, "data", "model", AXIS)
    body = functools.partial(_local_layer, cfg_local=sharding.per_device_config(cfg, mesh), window=window,
                             query_scores=wants_h2o, seq=seq, float32=x.dtype == jnp.float32,
                             # a mesh may lack the axis (sharding.py: any subset of the three axes)
                             tensor_axis="model" if "model" in mesh.axis_names else None)
    x, k_buf, v_buf, q_window, win_scores, h2o = jax.shard_map(
        body, mesh=mesh, in_specs=(param_specs, sharding.spec(mesh, "data", AXIS, None), rows),
        out_specs=(sharding.spec(mesh, "data", AXIS, None), sharding.spec(mesh, "data", "model", AXIS, None),
                   sharding.spec(mesh, "data", "model", AXIS, None), heads if window else None,
                   seq_scores if window else None, seq_scores if wants_h2o else None),
        check_vma=False)(params, x, lengths)
    width = plan.program_width
    if compress is None:
        k, v = k_buf[:, :, :width], v_buf[:, :, :width]
        pos = kv.prompt_positions(lengths, cfg.num_kv_heads, width)
    else:
        keys = jax.ShapeDtypeStruct(k_buf.shape, k_buf.dtype)                    # no device holds them all
        inputs = LayerInputs(keys, lengths, q_window, h2o, win_scores)
        idx = compress.select(inputs, layer_index, cfg.num_layers, impl)[:, :, :width]
        idx = sharding.constrain(idx, mesh, "data", "model", None)               # [B, K, W]
        gather = jax.shard_map(_gather_local, mesh=mesh, in_specs=(sharding.spec(mesh, "data", "model", AXIS, None),) * 2
                               + (sharding.spec(mesh, "data", "model", None),),
                               out_specs=(heads, heads), check_vma=False)
        k, v = gather(k_buf, v_buf, idx)
        pos = idx
    k, v, pos = kv.pad_slots(k, v, pos, width + plan.extra)
    k, v = (sharding.constrain(a, mesh, "data", "model", None, None) for a in (k, v))
    return x, k, v, sharding.constrain(pos, mesh, "data", "model", None)
