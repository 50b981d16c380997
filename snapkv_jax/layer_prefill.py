"""Layer-major, chunked prefill: the prompt goes through the model one layer at a time, and each layer
through the prompt one chunk at a time; the layer's KV is compressed before the next layer starts.

Per layer, one jitted program (the same compiled program for every layer: the layer's params and index
are arguments, the configs static):
  1. for each chunk of `chunk` tokens (`lax.fori_loop`, the first chunk peeled): RMSNorm, q/k/v, RoPE,
     write k/v into the layer's full-length buffers `[B, K, T, D]`, causal attention of the chunk against
     the buffers (models/chunked_attention.py), o_proj, MLP; the chunk's output overwrites its input in the
     hidden states `[B, T, Dm]`, and the queries a method needs are kept (the observation window's, or
     H2O's running scores);
  2. the compression method picks the kept positions (compression/) and they are gathered into this
     layer's cache arrays, padded with empty slots for decoding.
  3. a method that reconstructs the context (KVzip) first runs its reconstruction's hidden states through
     the layer against the complete buffers (reconstruction.py) for its scores; what is carried from layer
     to layer is then the triple (prompt's hidden states, reconstruction's, and for a global budget the
     kept candidates' ranks `[L, B, K, W]`), and a global budget's last step (`kvzip.global_select`) runs
     after the last layer.
The Python loop over layers dispatches these programs asynchronously. Alive at once: the params, the
hidden states, one layer's full K/V, one chunk's activations and the compressed caches (SnapKV,
arXiv 2404.14469: "only one layer ever holds the full prompt"); memory.py estimates that peak.

Compiling one layer program instead of an unrolled model also keeps compile time flat in the layer count:
the scoring kernel is compiled once, not once per layer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from snapkv_jax import cache as kv
from snapkv_jax import memory, sharding
from snapkv_jax import reconstruction, ring_prefill
from snapkv_jax.compression import LayerInputs, Method, collect_window, kvzip, select_on_mesh
from snapkv_jax.compression.base import gather_kept
from snapkv_jax.config import ModelConfig
from snapkv_jax.models.chunked_attention import causal_lse, resolve_implementation
from snapkv_jax.models.llama import DecoderLayer, Llama
from snapkv_jax.pallas import dispatch
from snapkv_jax.pallas.h2o_scores import chunk_scores_reference

_MIN_AUTO_CHUNK, _MAX_AUTO_CHUNK = 2048, 65536


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shape of one prefill. `width`: the prompt width T; `padded`: T rounded up to a multiple of
    `chunk`; `chunk`: tokens per chunk (== padded when unchunked); `widths`: prompt slots of each layer
    after compression (W_l); `extra`: empty slots after the prompt in every layer."""

    width: int
    padded: int
    chunk: int
    widths: tuple[int, ...]
    extra: int

    @property
    def program_width(self) -> int:
        return max(self.widths)


def prompt_widths(cfg: ModelConfig, width: int, compress: Method | None) -> tuple[int, ...]:
    """W_l per layer: the whole width uncompressed, else min(width, method.slots(l))."""
    if compress is None:
        return (width,) * cfg.num_layers
    return tuple(min(width, compress.slots(layer, cfg.num_layers)) for layer in range(cfg.num_layers))


def make_plan(cfg: ModelConfig, width: int, compress: Method | None, chunk: int | None, extra: int,
              seq: int = 1) -> Plan:
    """`seq` > 1: a sequence-parallel prefill (ring_prefill.py), one chunk of T'/seq positions per device."""
    if seq > 1:
        padded = ring_prefill.padded_width(width, seq)
        return Plan(width, padded, padded // seq, prompt_widths(cfg, width, compress), extra)
    chunk = width if chunk is None or chunk >= width else int(chunk)
    padded = -(-width // chunk) * chunk
    return Plan(width, padded, chunk, prompt_widths(cfg, width, compress), extra)


def estimate_peak(cfg: ModelConfig, plan: Plan, batch: int, itemsize: int, compress, attention: str) -> int:
    """memory.prefill_peak_bytes for this plan (params excluded)."""
    return memory.prefill_peak_bytes(
        cfg, batch=batch, width=plan.padded, chunk=plan.chunk, itemsize=itemsize, compress=compress,
        cache_slots=sum(w + plan.extra for w in plan.widths), flash=attention == "cudnn")


def auto_chunk(cfg: ModelConfig, width: int, batch: int, itemsize: int, compress, extra: int,
               attention: str, free: int | None) -> int | None:
    """`chunk="auto"`: unchunked up to 4K tokens; beyond, about width/8 (a power of two in [2K, 64K]: big
    enough for full-rate matmuls, at most ~16 chunks per layer), halved while the estimate exceeds the free
    memory (down to 512). A prompt of 4K tokens or fewer whose unchunked prefill would be refused is
    chunked the same way, from the largest power of two below its width: the longest prompt a refusal
    names (at chunk 512) must then run under "auto" too."""
    if width <= 4096:
        unchunked = make_plan(cfg, width, compress, None, extra)
        if width <= 512 or free is None or estimate_peak(cfg, unchunked, batch, itemsize, compress,
                                                           attention) <= free:
            return None
        chunk = 1 << (width - 1).bit_length() - 1
    else:
        chunk = min(_MAX_AUTO_CHUNK, max(_MIN_AUTO_CHUNK, 1 << (width // 8).bit_length() - 1))
    while free is not None and chunk > 512:
        plan = make_plan(cfg, width, compress, chunk, extra)
        if estimate_peak(cfg, plan, batch, itemsize, compress, attention) <= free * 0.9:
            break
        chunk //= 2
    return chunk


def check_fits(cfg: ModelConfig, plan: Plan, batch: int, itemsize: int, compress, attention: str,
               free: int | None) -> None:
    """Raises ValueError (one line: the estimate, the free memory, the longest prompt that fits at this
    chunk size) when the prefill's estimated peak exceeds the free device memory."""
    if free is None:
        return
    need = estimate_peak(cfg, plan, batch, itemsize, compress, attention)
    if need <= free:
        return

    def fits(width):
        p = make_plan(cfg, width, compress, None if plan.chunk == plan.padded else plan.chunk, plan.extra)
        return estimate_peak(cfg, p, batch, itemsize, compress, attention) <= free

    head = (f"this prefill needs about {memory.format_bytes(need)} besides the params, but "
            f"{memory.format_bytes(free)} are free ({memory.BUDGET_ENV} or the device)")
    if not fits(1):  # the reserved empty slots alone do not fit, whatever the prompt
        raise ValueError(f"{head}; the {plan.extra} empty slots reserved after the prompt (max_slots, or "
                         f"generate's max_new_tokens) do not fit even after a one-token prompt")
    longest = memory.largest_fitting_width(fits, plan.width)
    raise ValueError(f"{head}; at chunk={plan.chunk} the longest prompt that fits is about {longest} tokens for "
                     f"batch {batch} (or pass a smaller chunk)")


def _h2o_scores(scores, q, k_buf, lse, lengths, start, *, kernel, attention):
    """Adds the chunk's H2O contributions (q `[B, c, H, D]`) to `scores [B, H, T]`.

    `kernel`: the kernel back-end (pallas/dispatch.py; None for the reference), normalised by the
    attention's own log-sum-exp `lse [B, H, c]` when that is the causal one (`None` when a sliding window
    cut it short: then `causal_lse` computes it). Else the `jnp` reference, one query block at a time so
    that the float32 logits stay under memory.H2O_BLOCK_BYTES."""
    qh = q.transpose(0, 2, 1, 3)                                                 # [B, H, c, D]
    if kernel:
        if lse is None:
            lse = causal_lse(q, k_buf, start, implementation=attention)
        return scores + dispatch.h2o_chunk_scores(qh, k_buf, lse, lengths, start, backend=kernel)
    b, c, h, _ = q.shape
    t = k_buf.shape[2]
    block = c
    while block > 1 and b * h * block * t * 4 > memory.H2O_BLOCK_BYTES and block % 2 == 0:
        block //= 2
    for first in range(0, c, block):
        scores = scores + chunk_scores_reference(qh[:, :, first:first + block], k_buf, lengths, start + first)
    return scores


def _layer_step(carry, start, *, module, params, lengths, chunk, attention, h2o_kernel, causal):
    """One chunk of one layer. `causal`: the attention's log-sum-exp is the causal one (no sliding
    window reaches into the prompt), so H2O's kernel may reuse it."""
    x, k_buf, v_buf, q_window, scores = carry
    xc = lax.dynamic_slice_in_dim(x, start, chunk, axis=1)                       # [B, c, Dm]
    xc, q, k_buf, v_buf, lse = module.apply({"params": params}, xc, start, k_buf, v_buf, attention,
                                            method=DecoderLayer.prefill_chunk)
    x = lax.dynamic_update_slice_in_dim(x, xc, start, axis=1)
    if q_window is not None:
        q_window = collect_window(q_window, q, lengths, start)
    if scores is not None:
        scores = _h2o_scores(scores, q, k_buf, lse if causal else None, lengths, start, kernel=h2o_kernel,
                             attention=attention)
    return x, k_buf, v_buf, q_window, scores


def _layer(params, x, lengths, layer, *, cfg, compress, plan, impl, attention, mesh=None):
    """One layer of prefill. x `[B, T', Dm]` (T' = plan.padded) -> (x after the layer, k, v
    `[B, K, W + extra, D]`, pos `[B, K, W + extra]`) with W = plan.program_width. For a reconstructing
    method x is the triple (prompt `[B, T', Dm]`, reconstruction `[B, N, R, Dm]`, candidate ranks
    `[L, B, K, W]` or None), in and out.

    On a `mesh` (sharding.py; no `seq` axis here) XLA partitions the layer by rows over `data` and by
    heads over `model`, the constraints below pinning K/V and the scores to the devices of their KV head;
    each KV head's positions are selected on the device that holds it (`select_on_mesh`)."""
    x, xr, ranks = x if isinstance(x, tuple) else (x, None, None)
    b, t, _ = x.shape
    float32 = x.dtype == jnp.float32
    x = sharding.constrain(x, mesh, *_hidden_layout(mesh))
    buf = sharding.constrain(jnp.zeros((b, cfg.num_kv_heads, t, cfg.head_dim), x.dtype),
                             mesh, "data", "model", None, None)                  # [B, K, T', D]
    w = compress.observation_window if compress is not None else 0
    q_window = (sharding.constrain(jnp.zeros((b, cfg.num_heads, w, cfg.head_dim), x.dtype),
                                   mesh, "data", "model", None, None) if w else None)
    scores = (sharding.constrain(jnp.zeros((b, cfg.num_heads, t), jnp.float32), mesh, "data", "model", None)
              if compress is not None and compress.needs_query_scores else None)
    # The H2O kernel runs on one device (XLA cannot partition a Pallas call); on a mesh, the reference.
    h2o = None
    if scores is not None and mesh is None:
        h2o = dispatch.h2o_backend(impl, x.dtype, cfg.head_dim, cfg.group_size)
        h2o = None if h2o == "xla" else h2o
    step = functools.partial(_layer_step, module=DecoderLayer(cfg), params=params, lengths=lengths,
                             chunk=plan.chunk, attention=attention, h2o_kernel=h2o,
                             causal=cfg.sliding_window is None or t <= cfg.sliding_window)
    with jax.default_matmul_precision("float32" if float32 else None):
        carry = step((x, buf, buf, q_window, scores), 0)
        if t > plan.chunk:
            carry = lax.fori_loop(1, t // plan.chunk, lambda i, c: step(c, i * plan.chunk), carry)
        x, k_buf, v_buf, q_window, scores = carry
        if xr is not None:  # KVzip: its scores, from the reconstruction through this layer
            xr, scores = reconstruction.layer(params, xr, k_buf, v_buf, lengths, cfg=cfg, method=compress,
                                              width=plan.width, attention_impl=attention)
    width = plan.program_width
    if compress is None:
        k, v = k_buf[:, :, :width], v_buf[:, :, :width]
        pos = kv.prompt_positions(lengths, cfg.num_kv_heads, width)
    else:
        inputs = LayerInputs(k_buf, lengths, q_window, scores)
        if mesh is None:
            idx = compress.select(inputs, layer, cfg.num_layers, impl)
        else:
            idx = select_on_mesh(compress, inputs, layer, cfg.num_layers, impl, mesh)
        idx = sharding.constrain(idx[:, :, :width], mesh, "data", "model", None)  # [B, K, W]
        if ranks is not None:  # a global budget: the candidates' ranks, for the joint choice at the end
            ranks = lax.dynamic_update_index_in_dim(
                ranks, kvzip.kept_ranks(scores, idx, lengths, compress.sinks), layer, axis=0)
        k, v, pos = gather_kept(k_buf, v_buf, idx)
    k, v, pos = kv.pad_slots(k, v, pos, width + plan.extra)
    k, v = (sharding.constrain(a, mesh, "data", "model", None, None) for a in (k, v))
    return (x if xr is None else (x, xr, ranks)), k, v, sharding.constrain(pos, mesh, "data", "model", None)


@functools.cache
def _layer_program(sequence_parallel: bool = False):
    # Donating x lets each layer overwrite the previous layer's hidden states in place (GPU only: see
    # generate._decode_loop_program).
    donate = ("x",) if jax.default_backend() != "cpu" else ()
    return jax.jit(ring_prefill.layer if sequence_parallel else _layer,
                   static_argnames=("cfg", "compress", "plan", "impl", "attention", "mesh"), donate_argnames=donate)


def _hidden_layout(mesh) -> tuple:
    """How the hidden states `[B, T', Dm]` lie on a mesh: rows over `data`, positions over `seq`."""
    return ("data", "seq" if sharding.axis_size(mesh, "seq") > 1 else None, None)


def outer_params(params) -> dict:
    """The params outside the decoder layers (embedding, final norm, LM head): all that `_embed` and
    `_head` read. Passing only these keeps their calls from flattening every layer's weights on the host
    (~0.3 ms a call for a 32-layer model)."""
    return {name: p for name, p in params.items() if not name.startswith("layers_")}


@functools.partial(jax.jit, static_argnames=("cfg", "padded", "mesh", "compress"))
def _embed(params, tokens, lengths, *, cfg, padded, mesh=None, compress=None):
    """The prompt's hidden states `[B, T', Dm]`; for a reconstructing method, the triple with the
    reconstruction's `[B, N, R, Dm]` (reconstruction.py) and a global budget's empty candidate ranks."""
    x = Llama(cfg).apply({"params": params}, jnp.pad(tokens, ((0, 0), (0, padded - tokens.shape[1]))),
                         method=lambda m, t: m.embed(t))
    x = sharding.constrain(x, mesh, *_hidden_layout(mesh))
    if _reconstructs(compress):
        ranks = None
        if compress.budget == "global":
            shape = (cfg.num_layers, tokens.shape[0], cfg.num_kv_heads, min(tokens.shape[1], compress.cap))
            ranks = jnp.full(shape, -jnp.inf, jnp.float32)
        return x, reconstruction.embed(params, cfg, tokens, lengths, compress), ranks
    return x


def _reconstructs(compress) -> bool:
    return getattr(compress, "reconstructs", False)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _head(params, x, lengths, *, cfg):
    """Logits `[B, V]` of each row's last real token."""
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]   # [B, Dm]
    float32 = x.dtype == jnp.float32
    with jax.default_matmul_precision("float32" if float32 else None):
        return Llama(cfg).apply({"params": params}, last, method=Llama.logits)


class Programs(NamedTuple):
    """The compiled steps of a prefill, as callables of their traced arguments only:
    embed(outer, tokens, lengths) -> x; layer(layer_params, x, lengths, layer_index) -> (x, k, v, pos);
    head(outer, x, lengths) -> logits (outer: `outer_params`); for KVzip's global budget, finalize(ks, vs,
    ps, ranks) -> (ks, vs, ps) after the last layer. x: the hidden states, or for a reconstructing method
    (KVzip) the triple (prompt's, reconstruction's, candidate ranks or None), of which head reads the first."""

    embed: Callable
    layer: Callable
    head: Callable
    finalize: Callable | None = None  # a global budget's (ks, vs, ps, ranks) -> (ks, vs, ps)


def programs(params, cfg: ModelConfig, tokens, lengths, *, plan: Plan, compress: Method | None, impl: str,
             attention: str | None, ahead_of_time: bool = False, mesh=None) -> Programs:
    """The prefill's programs for these shapes. `ahead_of_time=True` compiles them now (so a caller can
    time compilation apart from the run); otherwise they compile on first call, through jit's cache.
    `mesh`: the devices the params and prompt live on (sharding.py), None for one device."""
    dtype = sharding.lead_param(params).dtype
    attention = resolve_implementation(attention, dtype)
    if _reconstructs(compress) and sharding.axis_size(mesh, "seq") > 1:
        raise ValueError(f"{type(compress).__name__}'s reconstruction pass does not run on a mesh's seq axis yet "
                         f"(seq={sharding.axis_size(mesh, 'seq')}); use the data and model axes")
    embed = functools.partial(_embed, cfg=cfg, padded=plan.padded, mesh=mesh, compress=compress)
    ring = sharding.axis_size(mesh, "seq") > 1
    layer = functools.partial(_layer_program(ring), cfg=cfg, compress=compress, plan=plan, impl=impl,
                              attention=attention, mesh=mesh)
    head = functools.partial(_head, cfg=cfg)
    finalize = None
    if _reconstructs(compress) and compress.budget == "global":
        finalize = functools.partial(kvzip.global_select, capacity=compress.capacity)
    if not ahead_of_time:
        return Programs(embed, layer, head, finalize)
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32)
    x = jax.ShapeDtypeStruct((tokens.shape[0], plan.padded, cfg.hidden_size), dtype,
                             sharding=None if mesh is None else sharding.named(mesh, *_hidden_layout(mesh)))
    if _reconstructs(compress):
        n, _, r = compress.layout(plan.width)
        b, w = tokens.shape[0], plan.program_width
        ranks = None
        if finalize is not None:
            ranks = jax.ShapeDtypeStruct((cfg.num_layers, b, cfg.num_kv_heads, w), jnp.float32)
            kv_struct = tuple(jax.ShapeDtypeStruct((b, cfg.num_kv_heads, w + plan.extra, cfg.head_dim), dtype)
                              for _ in range(cfg.num_layers))
            pos_struct = tuple(jax.ShapeDtypeStruct((b, cfg.num_kv_heads, w + plan.extra), jnp.int32)
                               for _ in range(cfg.num_layers))
            finalize = finalize.func.lower(kv_struct, kv_struct, pos_struct, ranks,
                                           capacity=compress.capacity).compile()
        x = (x, jax.ShapeDtypeStruct((b, n, r, cfg.hidden_size), dtype), ranks)
    outer = outer_params(params)
    return Programs(
        embed=_embed.lower(outer, tokens, lengths, cfg=cfg, padded=plan.padded, mesh=mesh,
                           compress=compress).compile(),
        layer=_layer_program(ring).lower(params["layers_0"], x, lengths, jnp.int32(0), cfg=cfg, compress=compress,
                                     plan=plan, impl=impl, attention=attention, mesh=mesh).compile(),
        head=_head.lower(outer, x[0] if isinstance(x, tuple) else x, lengths, cfg=cfg).compile(),
        finalize=finalize)


def run(params, cfg: ModelConfig, tokens, lengths, *, plan: Plan, programs: Programs,
        progress: bool = False) -> tuple[jax.Array, kv.KVCache]:
    """Prefills validated, right-padded `tokens [B, T]` (int32, T == plan.width) with `lengths [B]`.
    Returns the logits of each row's last token `[B, V]` and the cache (layer l: W_l + extra slots)."""
    lengths = jnp.asarray(lengths, jnp.int32)
    outer = outer_params(params)
    x = programs.embed(outer, tokens, lengths)
    ks, vs, ps = [], [], []
    layers = range(cfg.num_layers)
    if progress:
        from tqdm.auto import tqdm
        layers = tqdm(layers, desc=f"prefill {plan.width} tokens", unit="layer")
    for layer in layers:
        x, k, v, pos = programs.layer(params[f"layers_{layer}"], x, lengths, sharding.layer_index(layer))
        keep = plan.widths[layer] + plan.extra
        if keep < k.shape[2]:  # narrower layers (PyramidKV) drop the tail of holes
            k, v, pos = k[:, :, :keep], v[:, :, :keep], pos[:, :, :keep]
        ks.append(k), vs.append(v), ps.append(pos)
        if progress:
            jax.block_until_ready(x)
    if programs.finalize is not None:
        ks, vs, ps = programs.finalize(tuple(ks), tuple(vs), tuple(ps), x[2])
    cache = kv.KVCache(k=tuple(ks), v=tuple(vs), pos=tuple(ps), end=jnp.minimum(lengths, plan.program_width),
                       next_pos=lengths, lengths=jnp.copy(lengths),  # distinct buffers: each is donated
                       prompt_slots=plan.widths)
    return programs.head(outer, x[0] if isinstance(x, tuple) else x, lengths), cache


def auto_progress(plan: Plan, batch: int) -> bool:
    """Show a progress bar over layers for prefills of 64K+ tokens (seconds to minutes per layer)."""
    return batch * plan.width >= 65536
