"""Appending a segment to a live cache (`sk.extend`), layer by layer, optionally re-compressing each
layer right after it, and attending to a shared context held once.

One jitted program per group of LAYERS_PER_PROGRAM consecutive layers (the same compiled program for
every group of one width: the layers' params and the first index are arguments), each layer doing:
  1. for each chunk of the segment (`lax.fori_loop`, the first chunk peeled): RMSNorm, q/k/v, RoPE at
     positions next_pos[b] + i, the chunk's K/V written into the layer's cache after its occupied slots
     (padding tokens write nothing), attention of the chunk over every visible slot (its own earlier
     tokens included: models/slot_attention.py) and over the shared context, o_proj, MLP; the queries a
     method needs are kept (the segment's last `window`, or H2O's running scores);
  2. with `compress`, the method re-selects the layer's slots (compression/live.py) and the kept slots are
     gathered to the front of the layer, in slot (= position) order.
Invariants: `extend` never changes a slot it does not write or (when compressing) select; kept slots keep
their positions (RoPE is never re-applied); `next_pos` advances by each row's real new tokens; the old
cache is never donated, so a failed call leaves it as it was.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from snapkv_jax import cache as kv
from snapkv_jax import layer_prefill, sharding
from snapkv_jax.compression import Method, collect_window, live
from snapkv_jax.config import ModelConfig
from snapkv_jax.models.llama import DecoderLayer
from snapkv_jax.models.slot_attention import SlotPart

# Float32 logits of one chunk over the cache, [B, H, chunk, S] x 4 bytes, are kept under this by `auto`.
LOGITS_BUDGET = 1 << 29
# Layers per compiled program, at most. A short segment is host-bound: the host spends ~5-7 us per
# kernel launching each program (H200, a 64-token question onto a 32K context: 32 one-layer programs
# 20.5 ms of host time per call against 11.6 ms of device work), and the device waits for the first
# program's launch. Wall ms per call, 2 / 4 / 8 / 16 layers per program, same run (H200, 2026-12-03):
# full context 13.9 / 13.8 / 15.1 / 16.1, SnapKV C=1024 context 11.0 / 10.5 / 11.4 / 12.9; 4 and 8
# alternated four times in another run: full 13.3-13.7 vs 14.1-14.3, SnapKV equal within noise
# (`experiments/probe_tiling.py groups` is that measurement).
LAYERS_PER_PROGRAM = 4


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shape of one extend: `width` the padded segment width (a multiple of `chunk`), `chunk`
    tokens per chunk, `slots` the width every layer is processed at, `widths` each layer's width after
    the call, `fresh` whether every layer starts empty with its next slot 0 (rows started on a context)."""

    width: int
    chunk: int
    slots: int
    widths: tuple[int, ...]
    fresh: bool = False


def auto_chunk(cfg: ModelConfig, batch: int, width: int, slots: int) -> int:
    """Tokens per chunk: the whole segment while its float32 logits over `slots` (the row's own and a
    shared context's) stay under LOGITS_BUDGET, else the largest power of two that does (at least 1)."""
    per_token = batch * cfg.num_heads * slots * 4
    if width * per_token <= LOGITS_BUDGET:
        return width
    chunk = 1 << (width.bit_length() - 1)
    while chunk > 1 and chunk * per_token > LOGITS_BUDGET:
        chunk //= 2
    return chunk


def _layer(params, x, k, v, pos, writes, start, new, layer, context, *, cfg: ModelConfig,
           compress: Method | None, chunk: int, slots: int, keep: int, fresh: bool):
    """One layer of extend. x `[B, T, Dm]` (T a multiple of chunk); k, v `[B, K, S_l, D]`, pos `[B, K, S_l]`
    the layer's cache, widened here with empty slots to `slots` (S_l <= slots); writes `[L, B]` every
    layer's next slot, start `[B]` the position of each row's first new token, new `[B]` real new tokens;
    context: a shared SlotPart of this layer, or None; fresh: the layer is empty (a question's start on a
    shared context), so the first chunk fills its front slots. Returns (x, k, v `[B, K, keep, D]`, pos,
    next slot `[B]`). Everything a layer does happens here, inside a compiled program: a per-layer eager op costs
    more host time than the layer's device work (H200: 94 ms of host time for 32 layers' 11.6 ms)."""
    k, v, pos = kv.pad_slots(k, v, pos, slots)
    writes = writes[layer]                                                       # [B]
    b, t, _ = x.shape
    s = k.shape[2]
    module = DecoderLayer(cfg)
    w = compress.observation_window if compress is not None else 0
    h2o = compress is not None and compress.needs_query_scores
    q_window = jnp.zeros((b, cfg.num_heads, w, cfg.head_dim), x.dtype) if w else None
    scores = jnp.zeros((b, cfg.num_heads, s), jnp.float32) if h2o else None
    seen = jnp.zeros((b, cfg.num_kv_heads, s), jnp.float32) if h2o else None

    def step(first, carry):
        x, k, v, pos, q_window, scores, seen = carry
        xc = lax.dynamic_slice_in_dim(x, first, chunk, axis=1)                   # [B, c, Dm]
        i = first + jnp.arange(chunk)                                            # [c] segment-relative
        real = i[None, :] < new[:, None]                                         # [B, c]
        positions = start[:, None] + i                                           # [B, c]
        slots = jnp.where(real, writes[:, None] + i, s)                          # padding: dropped
        from_front = fresh and isinstance(first, int) and first == 0              # the peeled first chunk
        xc, q, k, v, pos = module.apply({"params": params}, xc, positions, slots, k, v, pos, context, from_front,
                                        method=DecoderLayer.extend_chunk)
        x = lax.dynamic_update_slice_in_dim(x, xc, first, axis=1)
        if q_window is not None:
            q_window = collect_window(q_window, q, new, first)
        if scores is not None:
            scores = scores + live.query_scores(q, positions, real, k, pos)
            seen = seen + live.seen_by(pos, positions, real)
        return x, k, v, pos, q_window, scores, seen

    with jax.default_matmul_precision("float32" if x.dtype == jnp.float32 else None):
        carry = step(0, (x, k, v, pos, q_window, scores, seen))
        if t > chunk:
            carry = lax.fori_loop(1, t // chunk, lambda j, c: step(j * chunk, c), carry)
    x, k, v, pos, q_window, scores, seen = carry
    occupied = writes + new                                                      # [B]
    if compress is None:
        return (x, *kv.fit_slots(k, v, pos, keep), occupied)
    window_attention = None
    if w:
        rel = jnp.arange(w)[None, :] - w + new[:, None]                          # [B, w] segment-relative
        window_attention = live.window_scores(q_window, start[:, None] + rel, rel >= 0, k, pos)
    idx = live.select(compress, k, pos, occupied, layer, cfg.num_layers, window_attention=window_attention,
                      query_scores=scores, seen=seen)                            # [B, K, C_max]
    k, v, pos = kv.fit_slots(*live.gather_slots(k, v, pos, idx), keep)
    compressed = occupied > compress.threshold(layer, cfg.num_layers)
    return x, k, v, pos, jnp.where(compressed, compress.slots(layer, cfg.num_layers), occupied)


def pack(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, tuple[tuple[str, tuple[int, ...], str], ...]]:
    """32-bit integer host `arrays` end to end in one int32 vector (their bits, unchanged), and each one's
    (name, shape, dtype) for `unpack`. Each array a call `device_put`s costs the host time on every call
    (H200 hosts, 2026-12-04: `device_put` of 1 / 3 / 9 small arrays 0.07-0.23 / 0.15-0.35 / 0.36-0.70 ms),
    so `extend` sends one."""
    flat = np.concatenate([np.ascontiguousarray(a).reshape(-1).view(np.int32) for a in arrays.values()])
    return flat, tuple((name, a.shape, a.dtype.str) for name, a in arrays.items())


def unpack(flat: jax.Array, layout) -> dict[str, jax.Array]:
    """The arrays `pack` laid end to end in `flat`, by name, in their shapes and dtypes (traced)."""
    out, at = {}, 0
    for name, shape, dtype in layout:
        n = int(np.prod(shape))
        piece = lax.slice_in_dim(flat, at, at + n).reshape(shape)
        out[name] = piece if np.dtype(dtype) == np.int32 else lax.bitcast_convert_type(piece, np.dtype(dtype))
        at += n
    return out


def _lengths_and_writes(host: dict, writes):
    """The segment's lengths `[B]` and the layers' next slots `[L, B]`: the unpacked host arrays' own
    `writes` when the call sent them, else the `writes` given (a device array)."""
    return host["lengths"], host.get("writes", writes)


def _layers(params, x, ks, vs, ps, writes, start, new, first, contexts, outer=None, *, cfg: ModelConfig,
            compress: Method | None, chunk: int, slots: int, keeps: tuple[int, ...], fresh: bool, layout=None):
    """Layers first, first + 1, ... of extend, one `_layer` after the other (params, ks, vs, ps, contexts
    and keeps: one entry per layer). Returns (x, ((k, v, pos) per layer), the layers' next slots `[G, B]`,
    the host arrays below).

    With a `layout` (the first group), x is the call's host arrays packed by `pack` (tokens `[B, T]` and
    lengths `[B]`, and writes `[L, B]` unless given, then any others), unpacked and embedded here with the
    `outer` params, so the device starts on the call's first layers one program launch after the transfer;
    the unpacked arrays but the tokens are returned, the others' (new, writes) to the later groups."""
    host = {}
    if layout is not None:
        host = unpack(x, layout)
        new, writes = _lengths_and_writes(host, writes)
        tokens = host.pop("tokens")
        x = layer_prefill._embed(outer, tokens, new, cfg=cfg, padded=tokens.shape[1])
    out, ends = [], []
    for j, (p, k, v, pos, context, keep) in enumerate(zip(params, ks, vs, ps, contexts, keeps)):
        x, k, v, pos, end = _layer(p, x, k, v, pos, writes, start, new, first + j, context, cfg=cfg,
                                   compress=compress, chunk=chunk, slots=slots, keep=keep, fresh=fresh)
        out.append((k, v, pos))
        ends.append(end)
    return x, tuple(out), jnp.stack(ends), host


@functools.cache
def _layers_program():
    return jax.jit(_layers, static_argnames=("cfg", "compress", "chunk", "slots", "keeps", "fresh", "layout"))


def layer_groups(num_layers: int) -> list[range]:
    """Consecutive layer ranges of equal size, the largest divisor of num_layers <= LAYERS_PER_PROGRAM
    (so every group runs the same compiled program)."""
    size = max(g for g in range(1, min(LAYERS_PER_PROGRAM, num_layers) + 1) if num_layers % g == 0)
    return [range(first, first + size) for first in range(0, num_layers, size)]


def make_plan(cfg: ModelConfig, cache: kv.KVCache, batch: int, width: int, chunk, compress: Method | None,
              extra: int, context_slots: int = 0, fresh: bool = False) -> Plan:
    """The plan of an extend whose cache gets `extra` more empty slots in every layer first (and whose
    rows also attend to a shared context whose logits take `context_slots` slots: 0 when they are never
    written, as by cuDNN); `fresh`: the cache was just made empty (its layers zero-wide, next slots 0)."""
    widths = [k.shape[2] + extra for k in cache.k]
    slots = max(widths)
    if compress is not None:
        widths = [max(wl, compress.slots(layer, cfg.num_layers)) for layer, wl in enumerate(widths)]
    if chunk == "auto":
        chunk = auto_chunk(cfg, batch, width, slots + context_slots)
    chunk = width if chunk is None or chunk >= width else int(chunk)
    return Plan(width=-(-width // chunk) * chunk, chunk=chunk, slots=slots, widths=tuple(widths),
                fresh=fresh and all(k.shape[2] == 0 for k in cache.k))


def run(params, outer, cfg: ModelConfig, cache: kv.KVCache, host: jax.Array, layout, writes, *, plan: Plan,
        compress: Method | None, context: kv.KVCache | None = None, context_blocks=None):
    """Appends a segment to a cache whose layers are plan.slots wide or narrower (each is widened with
    empty slots to plan.slots inside its program). `outer`: `layer_prefill.outer_params(params)`, which the
    caller also gives the LM head. `host`: the call's host arrays in one device vector
    (`pack`; `layout` its static layout): tokens `[B, plan.width]` (row b's first lengths[b] real),
    lengths `[B]`, the layers' next slots `writes [L, B]` (cache.py's `host_write_slots`, which the caller
    has already computed to plan the growth) unless given as a device array, and any others;
    `context_blocks`: per layer, the context's key blocks for cuDNN (`generate.context_blocks`), given
    when the context is attended to by cuDNN (models/slot_attention.py), None for the `jnp` path.
    Returns (x after the last layer, the new cache, the unpacked host arrays but the tokens). Per group of
    layers the host dispatches one program and nothing else (the first also unpacks and embeds), then
    one small program for the cache's bookkeeping, so a short segment's device work does not wait on
    the host."""
    program = functools.partial(_layers_program(), cfg=cfg, compress=compress, chunk=plan.chunk, slots=plan.slots,
                                fresh=plan.fresh)
    x, new, unpacked = host, None, None
    ks, vs, ps, ends = [], [], [], []
    for group in layer_groups(cfg.num_layers):
        contexts = tuple(None if context is None else
                         SlotPart(context.k[l], context.v[l], context.pos[l], shared=True,
                                  flash=context_blocks is not None,
                                  blocks=None if context_blocks is None else context_blocks[l])
                         for l in group)
        first = group.start == 0
        x, layers, group_ends, out = program(
            tuple(params[f"layers_{l}"] for l in group), x, tuple(cache.k[l] for l in group),
            tuple(cache.v[l] for l in group), tuple(cache.pos[l] for l in group), writes, cache.next_pos, new,
            sharding.layer_index(group.start), contexts, outer if first else None,
            keeps=tuple(plan.widths[l] for l in group), layout=layout if first else None)
        if first:
            unpacked = out
            new, writes = _lengths_and_writes(unpacked, writes)
        for k, v, pos in layers:
            ks.append(k), vs.append(v), ps.append(pos)
        ends.append(group_ends)
    end, offsets, next_pos = _after(tuple(ends), cache.next_pos, new)
    return (x, cache.replace(k=tuple(ks), v=tuple(vs), pos=tuple(ps), end=end, offsets=offsets, next_pos=next_pos),
            unpacked)


@jax.jit
def _after(group_ends, next_pos, new):
    """The cache's (end `[B]`, offsets `[L, B]`, next positions `[B]`) after the segment, from each group's
    next slots `[G, B]`: the bookkeeping in one dispatch."""
    end, offsets = kv.write_state(jnp.concatenate(group_ends))
    return end, offsets, next_pos + new
