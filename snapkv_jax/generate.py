"""Public entry points: `forward`, `prefill`, `extend`, `decode_step`, `generate`.

Each is a thin Python function that validates its inputs (DESIGN section 6: a `ValueError` naming the bad
value, before anything is traced) and then runs compiled programs with the configs static.

`prefill` is layer-major (layer_prefill.py): one compiled program per layer shape, dispatched once per layer,
compressing each layer's K/V with the `compress` method right after that layer. `generate` is that
prefill (or an `extend` of a given cache, or of a shared context) followed by one jitted program: a `lax.while_loop` of decode steps with sampling and per-row EOS
stopping, whose carry is the cache, so XLA updates it in place (no copy per step); the final cache is
returned for study. Prompt widths and `max_new_tokens` are bucketed (see `bucket_width`) so that a
notebook changing either compiles once per bucket, not once per value.
"""

from __future__ import annotations

import functools
import numbers
import weakref
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from snapkv_jax import cache as kv
from snapkv_jax import compression, memory, sharding
from snapkv_jax import decode_compress as decode_compress_lib
from snapkv_jax import extend as segment
from snapkv_jax import layer_prefill
from snapkv_jax.compression import Method
from snapkv_jax.compression.scoring import resolve_impl
from snapkv_jax.config import ModelConfig, finite_real
from snapkv_jax.models.chunked_attention import resolve_implementation
from snapkv_jax.models import slot_attention
from snapkv_jax.models.llama import Llama, is_fused, param_shapes

Params = Any
_MIN_BUCKET = 32
_ATTENTION_IMPLS = (None, "xla", "cudnn")


@flax.struct.dataclass
class GenerateOutput:
    tokens: jax.Array    # [B, N] generated tokens; after a row's EOS, filled with the pad id
    lengths: jax.Array   # [B] generated tokens per row, its EOS included
    cache: kv.KVCache    # the final cache: which prompt positions each layer kept, for study


def bucket_width(t: int) -> int:
    """The padded size for `t` prompt tokens (or new tokens): the smallest of 32, 48, 64, 96, 128, 192,
    ... (powers of two and 1.5x powers of two) that holds it. Two buckets per octave waste at most a
    third on padding while compiling only ~2 programs per doubling."""
    b = _MIN_BUCKET
    while True:
        if t <= b:
            return b
        if t <= b * 3 // 2:
            return b * 3 // 2
        b *= 2


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_flag(value, name: str) -> None:
    """Raises ValueError unless `value` is True or False (a NumPy bool too): a string such as "no" is
    truthy and would silently mean True."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {_show(value)}")


def _show(value) -> str:
    """`value`'s repr on one line (an array's or a PRNG key's repr spans several), for error messages."""
    return " ".join(repr(value).split())


def refuse_traced(value, what: str) -> None:
    """Raises ValueError when `value` is a jax tracer: the library's calls read their inputs on the host
    (shapes, lengths, positions) and run their own compiled programs, so they cannot run inside the
    caller's `jax.jit`, `vmap` or `grad`; without this the error comes from deep inside NumPy or jax."""
    if isinstance(value, jax.core.Tracer):
        raise ValueError(f"{what} is a traced value: prefill, extend, decode_step and generate compile and run "
                         f"their own programs and read their inputs on the host, so they cannot be called "
                         f"inside jax.jit, vmap or grad; call them outside (they are jitted inside)")


def _as_prompt(cfg: ModelConfig, tokens, lengths) -> tuple[np.ndarray, np.ndarray]:
    """Checks tokens `[B, T]` and lengths `[B]` on the host; returns them as int32 NumPy arrays, with
    every padding entry set to token 0. Padding is never attended to by real tokens, but its K/V fills
    the padding slots, where an out-of-vocabulary id would embed as NaN and 0 x NaN poisons attention."""
    refuse_traced(tokens, "tokens")
    refuse_traced(lengths, "lengths")
    try:
        tokens = np.asarray(tokens)
    except ValueError:  # NumPy's "inhomogeneous shape": a list of rows of different lengths
        raise ValueError("tokens must be a [batch, width] array: right-pad rows of different lengths and "
                         "pass their real lengths as lengths=") from None
    if tokens.ndim != 2 or tokens.shape[0] < 1:
        raise ValueError(f"tokens must be [batch, width] with batch >= 1, got shape {tokens.shape}")
    if tokens.shape[1] < 1:
        raise ValueError("empty prompt: tokens has width 0")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    b, t = tokens.shape
    lengths = np.full((b,), t, np.int32) if lengths is None else np.asarray(lengths)
    if lengths.shape != (b,):
        raise ValueError(f"lengths must have shape ({b},) to match tokens {tokens.shape}, got {lengths.shape}")
    if not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")
    if (lengths < 1).any():
        row = int(np.argmin(lengths))
        raise ValueError(f"empty prompt: lengths[{row}]={int(lengths[row])}; every row needs >= 1 token")
    if (lengths > t).any():
        row = int(np.argmax(lengths))
        raise ValueError(f"lengths[{row}]={int(lengths[row])} exceeds the tokens width {t}")
    is_real = np.arange(t)[None, :] < lengths[:, None]                          # [B, T]
    real = tokens[is_real]
    if real.min() < 0 or real.max() >= cfg.vocab_size:
        bad = int(real.min() if real.min() < 0 else real.max())
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
    return np.where(is_real, tokens, 0).astype(np.int32), lengths.astype(np.int32)


def _check_positions(cfg: ModelConfig, last_position: int, what: str):
    if last_position > cfg.max_position_embeddings:
        raise ValueError(f"{what} needs {last_position} positions, more than the model's "
                         f"max_position_embeddings={cfg.max_position_embeddings}")


def _check_prompt_positions(cfg: ModelConfig, longest: int, compress: Method | None) -> None:
    """The longest prompt's positions, and those its compression uses (KVzip's reconstruction runs after
    the prompt), within max_position_embeddings."""
    _check_positions(cfg, longest, "the prompt")
    needed = longest if compress is None else compress.positions(longest)
    if needed > longest:
        _check_positions(cfg, needed, f"the prompt and its {type(compress).__name__} reconstruction")


@functools.cache
def _param_layout(cfg: ModelConfig, fused: bool):
    """(top-level names of `cfg`'s params, {name: {path: shape}} of each but layers 1 .. L-1, which hold
    the same arrays as layer 0, (the dict keys from a layer down to its first array, their `keystr`)),
    traced once per config and layout (`fused`: fuse_projections')."""
    shapes = param_shapes(cfg, fused=fused)
    checked = {name: {jax.tree_util.keystr(path): leaf.shape
                      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
               for name, tree in shapes.items() if not name.startswith("layers_") or name == "layers_0"}
    first = jax.tree_util.tree_flatten_with_path(shapes["layers_0"])[0][0][0]
    return frozenset(shapes), checked, (tuple(entry.key for entry in first), jax.tree_util.keystr(first))


def check_params(params, cfg: ModelConfig) -> None:
    """Raises ValueError unless `params` have the arrays `cfg`'s model has, in their shapes: the params of
    another model or config fail inside jit, or, with fewer layers in `cfg` or a tied head, run and
    silently compute another model. Of the layers, only layer 0's shapes and arrays are checked, and the
    first array of each other layer (a config or a cast changes every layer alike), which keeps this
    cheap enough for every `decode_step`: they must be jax arrays of one floating dtype (NumPy arrays,
    integer or mixed dtypes failed inside jit or returned zeros)."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg must be a snapkv_jax.ModelConfig (sk.load returns one), got {type(cfg).__name__}"
                         f"{'; params and cfg swapped?' if isinstance(params, ModelConfig) else ''}")
    if not hasattr(params, "keys"):
        raise ValueError(f"params must be the dict of arrays init_params, load or load_hf return, got "
                         f"{type(params).__name__}")
    fused = is_fused(params)
    names, checked, (first_keys, first_path) = _param_layout(cfg, fused)
    missing, extra = sorted(names - set(params.keys())), sorted(set(params.keys()) - names)
    if missing or extra:
        few = lambda xs: ", ".join(map(repr, xs[:3])) + (f" and {len(xs) - 3} more" if len(xs) > 3 else "")
        wrong = ([f"lack {few(missing)}"] if missing else []) + ([f"hold {few(extra)}, not in it"] if extra else [])
        raise ValueError(f"params do not fit this config ({cfg.num_layers} layers"
                         f"{', tied head' if cfg.tie_word_embeddings else ''}): they {' and '.join(wrong)}; params "
                         f"of another model or config?")
    arrays = {}
    for name, want in checked.items():
        got = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params[name])[0]}
        for path, shape in want.items():
            if getattr(got.get(path), "shape", None) != shape:
                raise ValueError(f"params['{name}']{path} has shape {getattr(got.get(path), 'shape', None)} but "
                                 f"this config needs {shape}: params of another model or config?")
        arrays |= {(name, path): leaf for path, leaf in got.items()}
    for name in names - checked.keys():                        # layers 1 .. L-1: their first array
        leaf = params[name]
        for key in first_keys:
            if not hasattr(leaf, "keys") or key not in leaf:
                raise ValueError(f"params['{name}'] lacks {first_path}, which layer 0 has: params of another "
                                 f"model or config?")
            leaf = leaf[key]
        arrays[(name, first_path)] = leaf
    _check_param_arrays(arrays)
    refuse_traced(sharding.lead_param(params), "params")


def _check_param_arrays(arrays: dict[tuple[str, str], Any]) -> None:
    """Raises ValueError unless the params' `arrays` ({(top-level name, path below it): leaf}) are jax
    arrays of one floating dtype."""
    for (name, path), leaf in arrays.items():
        if not isinstance(leaf, jax.Array):
            raise ValueError(f"params['{name}']{path} is a {type(leaf).__module__}.{type(leaf).__name__}, not a "
                             f"jax array: put the params on a device first (jax.device_put(params)), as load "
                             f"returns them")
    dtypes = {leaf.dtype for leaf in arrays.values()}
    if len(dtypes) > 1 or not jnp.issubdtype(next(iter(dtypes)), jnp.floating):
        where = {d: next(f"params['{n}']{p}" for (n, p), leaf in arrays.items() if leaf.dtype == d) for d in dtypes}
        raise ValueError(f"params must share one floating dtype, got {', '.join(f'{d} ({w})' for d, w in where.items())}"
                         f": cast them all, e.g. jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)")


def _check_backends(cfg: ModelConfig, implementation, snap_impl=None) -> None:
    """Raises ValueError for an unknown attention `implementation` or scoring `snap_impl`, before jit."""
    if implementation not in _ATTENTION_IMPLS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; use one of {_ATTENTION_IMPLS}")
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"implementation='cudnn' needs a GPU; this backend is {jax.default_backend()!r}")
    if snap_impl is not None:
        resolve_impl(snap_impl, cfg.head_dim)


def _on_mesh(params, cfg: ModelConfig, mesh, batch: int):
    """(params, mesh) for a call: the mesh passed, else the one the params live on (None: one device);
    params placed on it (a no-op when they already are). Raises ValueError for a mesh that cannot hold
    the model or the batch."""
    mesh = sharding.resolve_mesh(mesh, params)
    sharding.check_mesh(mesh, cfg, batch)
    if mesh is not None:
        params = sharding.shard_params(params, cfg, mesh)
    return params, mesh


def _check_chunk(chunk) -> None:
    if chunk is None or chunk == "auto":
        return
    if not _is_int(chunk) or chunk < 1:
        raise ValueError(f"chunk must be 'auto', None or a positive integer, got {chunk!r}")


def prompt_slots(cfg: ModelConfig, width: int, compress: Method | None) -> int:
    """Slots the widest layer's prompt occupies after prefill of a `width`-wide batch: the width, or the
    method's widest layer when that is narrower."""
    return max(layer_prefill.prompt_widths(cfg, width, compress))


def plan_prefill(params, cfg: ModelConfig, tokens: np.ndarray, compress: Method | None, chunk, extra: int,
                 implementation, mesh=None) -> layer_prefill.Plan:
    """The static plan of a prefill: `chunk="auto"` resolved against the free device memory, and the
    estimated peak checked against it (ValueError naming both when it does not fit). On a mesh the
    estimate is one device's: its rows and its heads (hidden states counted whole)."""
    cfg, batch = sharding.per_device(cfg, tokens.shape[0], mesh)
    width = tokens.shape[1]
    dtype = sharding.lead_param(params).dtype
    itemsize, attention = dtype.itemsize, resolve_implementation(implementation, dtype)
    free = memory.free_bytes()
    seq = sharding.axis_size(mesh, "seq")
    if seq > 1:  # one chunk of T/seq per device, attended in jnp (ring_prefill.py)
        plan = layer_prefill.make_plan(cfg, width, compress, None, extra, seq)
        local = layer_prefill.make_plan(cfg, plan.chunk, compress, None, extra)
        layer_prefill.check_fits(cfg, local, batch, itemsize, compress, "xla", free)
        return plan
    if chunk == "auto":
        chunk = layer_prefill.auto_chunk(cfg, width, batch, itemsize, compress, extra, attention, free)
    plan = layer_prefill.make_plan(cfg, width, compress, chunk, extra)
    layer_prefill.check_fits(cfg, plan, batch, itemsize, compress, attention, free)
    return plan


def _apply(params, cfg: ModelConfig, *args, method):
    """`Llama(cfg).apply` under jit. float32 params get float32 matmuls on every backend: on GPUs, XLA's
    default precision runs float32 dots in TF32, measured on an H100 at up to 4e-3 from HF's float32
    logits. bfloat16 params keep the default (bf16 tensor-core dots)."""
    float32 = sharding.lead_param(params).dtype == jnp.float32
    with jax.default_matmul_precision("float32" if float32 else None):
        return Llama(cfg).apply({"params": params}, *args, method=method)


# --- forward -------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("cfg", "implementation"))
def _forward(params, tokens, cfg, implementation):
    return _apply(params, cfg, tokens, implementation, method=Llama.forward)


def forward(params: Params, cfg: ModelConfig, tokens, *, implementation: str | None = None,
            mesh=None) -> jax.Array:
    """Logits `[B, T, V]` (float32) of a full causal pass over `tokens [B, T]`, no cache.

    `implementation` picks `jax.nn.dot_product_attention`'s backend (None: cuDNN on GPU where possible).
    `mesh`: run over several devices (sharding.py; default: the mesh the params live on, if any).
    """
    check_params(params, cfg)
    tokens, _ = _as_prompt(cfg, tokens, None)
    _check_positions(cfg, tokens.shape[1], "the prompt")
    _check_backends(cfg, implementation)
    params, mesh = _on_mesh(params, cfg, mesh, tokens.shape[0])
    if mesh is not None:
        (tokens,) = sharding.place_rows(mesh, tokens)
    return _forward(params, tokens, cfg=cfg, implementation=implementation)


# --- prefill -------------------------------------------------------------------------------------

def prefill(params: Params, cfg: ModelConfig, tokens, lengths=None, *, max_slots: int | None = None,
            compress: Method | None = None, chunk: int | str | None = "auto", snap_impl: str = "auto",
            implementation: str | None = None, mesh=None) -> tuple[jax.Array, kv.KVCache]:
    """Runs right-padded prompts `tokens [B, T]` (row b's real length `lengths[b]`, default T) through
    the model, layer by layer. Returns the logits of each row's last real token `[B, V]` and a KVCache.

    `compress`: a compression method (`SnapKV`, `StreamingLLM`, `H2O`, `RandomKV`, `PyramidKV`,
    `AdaKV`, `KVzip`) applied to each layer right after it; rows within the method's capacity are untouched
    (PyramidKV: within a layer's slots, `method.threshold`).
    `max_slots`: slots of the widest layer (default: what the prompt needs); every layer gets the same
    number of empty slots after its prompt. `chunk`: tokens per chunk of the layer-major prefill; "auto"
    picks it from the prompt length and the free device memory, None prefills each layer in one piece.
    `mesh`: run over several devices (sharding.py; default: the mesh the params live on, if any); the
    cache comes back split by row over `data` and by KV head over `model`. `snap_impl`: the scoring
    kernels' back-end, "auto", "pallas", "mosaic", "triton" or "xla" (pallas/dispatch.py).

    Raises ValueError for an empty prompt, lengths beyond the width, tokens outside the vocabulary, a
    prompt (with KVzip, its reconstruction after it) longer than the model's positions, `max_slots`
    smaller than the prompt needs, a bad method, chunk or snap_impl, or a prefill whose estimated peak
    memory exceeds the free device memory;
    RuntimeError when an explicit kernel `snap_impl` cannot run on this device and jax.
    """
    check_params(params, cfg)
    _check_compress(cfg, compress)
    _check_backends(cfg, implementation, snap_impl)
    _check_chunk(chunk)
    tokens, lengths = _as_prompt(cfg, tokens, lengths)
    _check_prompt_positions(cfg, int(lengths.max()), compress)
    needed = prompt_slots(cfg, tokens.shape[1], compress)
    if max_slots is not None and not _is_int(max_slots):
        raise ValueError(f"max_slots must be an integer, got {max_slots!r}")
    slots = needed if max_slots is None else int(max_slots)
    if slots < needed:
        raise ValueError(f"max_slots={max_slots} is smaller than the {needed} slots this prompt needs")
    params, mesh = _on_mesh(params, cfg, mesh, tokens.shape[0])
    plan = plan_prefill(params, cfg, tokens, compress, chunk, slots - needed, implementation, mesh)
    return _run_prefill(params, cfg, tokens, lengths, plan, compress, snap_impl, implementation, mesh)


def _run_prefill(params, cfg, tokens, lengths, plan, compress, snap_impl, implementation, mesh):
    if mesh is not None:
        tokens, lengths = sharding.place_rows(mesh, tokens, lengths)
    else:  # committed where the params are: decode's outputs are, so the cache keeps one jit signature
        tokens, lengths = jax.device_put((tokens, lengths), sharding.lead_param(params).sharding)
    programs = layer_prefill.programs(params, cfg, tokens, lengths, plan=plan, compress=compress,
                                      impl=resolve_impl(snap_impl, cfg.head_dim), attention=implementation,
                                      mesh=mesh)
    return layer_prefill.run(params, cfg, tokens, lengths, plan=plan, programs=programs,
                             progress=layer_prefill.auto_progress(plan, len(tokens)))


def _check_compress(cfg: ModelConfig, compress, name: str = "compress") -> None:
    compression.check_method(compress, cfg.num_layers, name)
    if compress is not None:
        compress.check_tokens(cfg.vocab_size)


# --- extend --------------------------------------------------------------------------------------

def check_cache(params, cfg: ModelConfig, cache, what: str = "cache", remember: bool = False) -> None:
    """Raises ValueError unless `cache` is a KVCache made for `cfg` (layers, KV heads, head_dim) in the
    params' dtype. `remember`: walk its layers once per cache object (for a shared context, passed with
    every question; a KVCache is frozen and its arrays immutable)."""
    if not isinstance(cache, kv.KVCache):
        raise ValueError(f"{what} must be a snapkv_jax.KVCache (from prefill, extend or generate), got "
                         f"{type(cache).__name__}")
    refuse_traced(cache.next_pos, what)
    # a donation deletes the layers' arrays (and, on jax 0.10.2, the [B] vectors too; jax 0.11.2's CPU
    # client keeps those): two of them tell, without walking every layer per step
    if any(getattr(x, "is_deleted", lambda: False)() for x in (cache.next_pos, *cache.k[:1])):
        raise ValueError(f"{what} was donated to an earlier call (decode_step(..., donate=True) hands its "
                         f"buffers to the step): use the cache that call returned")
    dtype = sharding.lead_param(params).dtype
    shape = (cache.num_layers, cache.k[0].shape[1], cache.k[0].shape[3]) if cache.k else (0, 0, 0)
    want = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    if shape != want:
        raise ValueError(f"{what} was built for another model: (layers, kv_heads, head_dim) = {shape}, "
                         f"this config has {want}")
    if cache.k[0].dtype != dtype:
        raise ValueError(f"{what} holds {cache.k[0].dtype} K/V but the params are {dtype}")
    if remember:
        _remembered("cache shapes", (cache,), lambda: _check_cache_shapes(cache, what))
    else:
        _check_cache_shapes(cache, what)


def _check_cache_shapes(cache: kv.KVCache, what: str) -> None:
    """Raises ValueError unless every layer's k, v `[B, K, S_l, D]` and pos `[B, K, S_l]` agree with layer 0's
    batch, heads, head_dim and dtype and with each other's slots, and end, next_pos and lengths are `[B]`
    (a cache assembled by hand would otherwise fail deep inside a compiled program)."""
    b, heads, _, d = cache.k[0].shape
    if len(cache.v) != cache.num_layers or len(cache.pos) != cache.num_layers:
        raise ValueError(f"{what} has {cache.num_layers} layers of keys but {len(cache.v)} of values and "
                         f"{len(cache.pos)} of positions")
    for layer, (k, v, pos) in enumerate(zip(cache.k, cache.v, cache.pos)):
        if (k.shape[:2] + k.shape[3:] != (b, heads, d) or v.shape != k.shape or pos.shape != k.shape[:3]
                or v.dtype != k.dtype or k.dtype != cache.k[0].dtype):
            raise ValueError(f"{what} layer {layer}: k {k.shape} {k.dtype}, v {v.shape} {v.dtype}, pos {pos.shape} "
                             f"do not agree (want k and v [{b}, {heads}, slots, {d}], pos [{b}, {heads}, slots])")
    for name in ("end", "next_pos", "lengths"):
        if getattr(cache, name).shape != (b,):
            raise ValueError(f"{what}.{name} has shape {getattr(cache, name).shape}, want ({b},) (one per row)")


def check_context(params, cfg: ModelConfig, context) -> None:
    """Raises ValueError unless `context` is None or a batch-1 KVCache for `cfg`."""
    if context is None:
        return
    check_cache(params, cfg, context, "context", remember=True)
    if context.batch != 1:
        raise ValueError(f"context must be the cache of one context (batch 1), got batch {context.batch}; "
                         f"prefill the shared document alone")
    if context.on_context:
        raise ValueError("context holds rows' own tokens after another context (it was started with "
                         "context=), not a document: pass the prefill of the shared document")


def check_context_mesh(context, mesh) -> None:
    """Raises ValueError unless `context` (or None) can serve rows on `mesh`, the call's mesh (None: one
    device): it lives there (prefilled with the params and mesh it is used with), and the mesh has no
    `data` axis (the one context is not split by row; each device would need its own copy). A mesh of
    one device counts as one device, as `sharding.array_mesh` counts the context's placement."""
    if context is None:
        return
    mesh = sharding.several_devices(mesh)
    if (data := sharding.axis_size(mesh, "data")) > 1:
        raise ValueError(f"context= does not run on a mesh's data axis yet (data={data}); use a mesh of the "
                         f"model or seq axes, or one device")
    where = sharding.array_mesh(context.k[0])
    if where != mesh:
        def place(m):
            return "one device" if m is None else f"a mesh (axes {dict(m.shape)})"
        raise ValueError(f"the context lives on {place(where)} but this call runs on {place(mesh)} (mesh=, else "
                         f"the params' mesh): prefill the context with the params and mesh it is used with")


@jax.jit
def _lowest_positions(pos, next_pos):
    """`[B]` the smallest position each row holds in any layer (its next_pos when it holds none)."""
    top = jnp.iinfo(jnp.int32).max
    held = [jnp.min(jnp.where(p >= 0, p, top), axis=(1, 2), initial=top) for p in pos]
    return jnp.minimum(jnp.min(jnp.stack(held), axis=0), next_pos)


def _check_pairing(cache: kv.KVCache, context: kv.KVCache | None) -> None:
    """Raises ValueError unless a rows' own cache comes with a context and any other cache without one:
    without its context the rows would silently answer from their own tokens alone; a cache prefilled on
    its own would hold positions the context holds too, so the rows would attend to two tokens at each."""
    if cache.on_context and context is None:
        raise ValueError("this cache holds rows' own tokens after a shared context (it was started with "
                         "context=): pass the same context= again")
    if context is not None and not cache.on_context:
        raise ValueError("with context=, the cache holds the rows' own tokens after that context (start it "
                         "with extend(params, cfg, None, tokens, context=context)); this one was not started "
                         "on a context")


def _check_follows(context: kv.KVCache, lowest: np.ndarray, marks: np.ndarray | None) -> None:
    """Raises ValueError unless the rows' own tokens start right after `context` (`lowest [B]`, each row's
    lowest held position, or its next position when it holds none: `_lowest_positions`) and were started
    on this very context (`marks [B]`, the fingerprint each row was started with: `context_fingerprint`):
    rows started on another context would attend to a document they were not asked about, or leave a gap
    in positions."""
    first = int(context_next_pos(context)[0])
    if (lowest != first).any():
        row = int(np.argmax(lowest != first))
        raise ValueError(f"row {row} of the cache starts at position {int(lowest[row])}, but this context's "
                         f"positions run to {first - 1}: pass the context the rows were started on")
    if marks is not None and (marks != context_fingerprint(context)).any():
        row = int(np.argmax(marks != context_fingerprint(context)))
        raise ValueError(f"row {row} of the cache was started on another context of the same length ({first} "
                         f"positions; its keys differ from this one's): pass the context the rows were started on")


def context_fingerprint(context: kv.KVCache) -> int:
    """A uint32 digest of the shared `context`'s last layer (keys and positions), computed once per
    context (`_remembered`). Rows started on a context carry it (`KVCache.context_mark`). The last layer's
    key at a position depends on every token up to it, so two documents of the same length that differ
    anywhere differ there (up to a 2^-32 chance of equal digests)."""
    return _remembered("fingerprint", (context.k[-1], context.pos[-1]),
                       lambda: int(jax.device_get(_fingerprint(context.k[-1], context.pos[-1]))))


@jax.jit
def _fingerprint(keys, pos):
    """uint32 digest of `keys [1, K, S, D]` (their bits) and `pos [1, K, S]`: a sum of each element's
    bits times a multiplier that depends on its index (Knuth's 2654435761), wrapping mod 2^32, so it is
    exact and the same on every device and in any reduction order."""
    def digest(x, salt):
        bits = lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
        index = lax.iota(jnp.uint32, x.size).reshape(x.shape)
        return jnp.sum(bits * (index * jnp.uint32(2654435761) + jnp.uint32(salt)), dtype=jnp.uint32)
    return digest(keys, 1) + digest(pos, 2) * jnp.uint32(2246822519)


def check_continuation(params, cfg: ModelConfig, cache, context, max_slots) -> None:
    """Raises ValueError for `generate`'s (or a stream's) `max_slots` without a `cache` or `context` to
    bound (a fresh prefill sizes its cache itself), or a `cache` that is not a KVCache for `cfg`. Runs
    before anything reads the cache, after `check_params` (check_cache reads the params' dtype)."""
    if max_slots is not None and context is None and cache is None:
        raise ValueError(f"max_slots={_show(max_slots)} bounds the growth of a given cache= or context= rows; "
                         f"a fresh prefill allocates what the prompt and max_new_tokens need")
    if cache is not None:
        check_cache(params, cfg, cache)
    check_context(params, cfg, context)  # its mesh is checked once the call has resolved the mesh


def extend(params: Params, cfg: ModelConfig, cache: kv.KVCache | None, tokens, lengths=None, *,
           compress: Method | None = None, max_slots: int | None = None, chunk: int | str | None = "auto",
           context: kv.KVCache | None = None, mesh=None) -> tuple[jax.Array, kv.KVCache]:
    """Appends a right-padded segment `tokens [B, T]` (row b's real length `lengths[b]`, default T) to
    a live cache (from `prefill`, `decode_step`, `generate` or `extend`, compressed or not). Returns the
    logits of each row's last new token `[B, V]` (ready for `decode_step`/`generate`) and a new cache.

    The new tokens get positions next_pos[b] .., are written after each layer's occupied slots, and attend
    to every slot the row holds and causally to each other; earlier slots are not changed. When a layer
    lacks free slots, every layer grows by the same number of empty slots, the widest one to a width
    bucket (`bucket_width`, so repeated turns reuse compiled programs) but never past `max_slots`.
    `compress`: after the segment, each layer re-selects `capacity` slots over the whole live cache by
    the method (compression/live.py: the segment's last `window` tokens are the observation window);
    rows whose layer holds no more than the method's threshold are untouched; kept slots stay in
    position order with their original positions. `chunk`: segment tokens per chunk ("auto": as many as
    keep the chunk's float32 logits over the cache under 512 MiB).
    `context`: a batch-1 cache (a `prefill` of one shared document) that every row also attends to,
    held once in memory; `cache` then holds the rows' own slots, or None to start them (positions
    continue the context's). `mesh`: as in `prefill` (default: the mesh the params live on); the cache is
    moved onto it, split by row and KV head, when it is not there yet, and a context must live on it.

    Raises ValueError for params or a cache of another model or batch, tokens outside the vocabulary,
    positions past max_position_embeddings, a growth past `max_slots` (or a `compress` keeping more slots
    per layer than it), `compress` with `context`, a context of batch != 1 or a cache holding positions
    inside the context's, a context on a mesh with a `data` axis (not supported yet) or placed apart from
    the params, or a cache on a mesh with params on one device. The input cache is never modified.
    """
    return _extend(params, cfg, cache, tokens, lengths, compress=compress, max_slots=max_slots, chunk=chunk,
                   context=context, mesh=mesh, reserve=0, what="the segment")


def _extend(params, cfg, cache, tokens, lengths, *, compress, max_slots, chunk, context, mesh, reserve, what,
            generated=0):
    """`extend` that also leaves `reserve` free slots after the segment (generate's decode budget) and
    checks that `generated` tokens more stay within max_position_embeddings."""
    check_params(params, cfg)
    _check_compress(cfg, compress)
    if compress is not None and not compress.reselects_live:
        raise ValueError(f"{type(compress).__name__} cannot re-compress a live cache (extend's compress=)")
    if compress is not None and context is not None:
        raise ValueError("compress= with context= is not supported: the shared context is compressed once, "
                         "by prefill, and the rows' own slots are never compressed")
    _check_chunk(chunk)
    if max_slots is not None and (not _is_int(max_slots) or max_slots < 1):
        raise ValueError(f"max_slots must be a positive integer, got {max_slots!r}")
    max_slots = None if max_slots is None else int(max_slots)  # a NumPy uint64 would leak into pad widths
    if compress is not None and max_slots is not None:
        if (kept := compress.max_slots(cfg.num_layers)) > max_slots:
            raise ValueError(f"compress={type(compress).__name__} keeps up to {kept} slots in a layer, more than "
                             f"max_slots={max_slots}")
    tokens, lengths = _as_prompt(cfg, tokens, lengths)
    params, mesh = _on_mesh(params, cfg, mesh, tokens.shape[0])
    check_context(params, cfg, context)
    check_context_mesh(context, mesh)
    batch = tokens.shape[0]
    lead = sharding.lead_param(params)
    started = cache is None
    if started:
        if context is None:
            raise ValueError("cache=None needs context=: there is nothing to extend")
        next_pos = np.broadcast_to(context_next_pos(context), (batch,))
        cache, first_writes = _own_cache(cfg, context, next_pos, lead.dtype, lead.sharding)  # follows it by construction
        writes = np.zeros((cfg.num_layers, batch), np.int64)                     # [L, B]
    else:
        check_cache(params, cfg, cache)
        if cache.batch != batch:
            raise ValueError(f"tokens have {batch} rows but the cache has batch {cache.batch}")
        cache = sharding.place_cache(cache, mesh)
        next_pos, writes = _host_state(cache, context)
    _check_positions(cfg, int((next_pos + lengths).max()) + max(generated - 1, 0),
                     f"{what} after {int(next_pos.max())} cached positions"
                     + (f" plus max_new_tokens={generated}" if generated else ""))
    extra = _growth(cache, writes, lengths, reserve, max_slots, generated)
    width = bucket_width(tokens.shape[1])
    flash = context_flash(params, cfg, context)
    # the logits budget and the free memory are one device's: on a mesh it holds its rows (`data`) and
    # KV heads (`model`)
    local_cfg, local_batch = sharding.per_device(cfg, batch, mesh)
    # cuDNN never writes the context's logits, so they do not count against the chunk's logits budget
    plan = segment.make_plan(local_cfg, cache, local_batch, width, chunk, compress, extra,
                             0 if context is None or flash else max(k.shape[2] for k in context.k), fresh=started)
    if extra:
        _check_growth_fits(local_cfg, plan, local_batch, lead.dtype.itemsize, lengths, reserve)
    # every host array of the call goes over in one transfer, unpacked and embedded by the first layers'
    # program (the tokens padded to the bucket's width here, so it compiles once per bucket)
    tokens = np.pad(tokens, ((0, 0), (0, plan.width - tokens.shape[1])))
    host = dict(tokens=tokens, lengths=lengths) | (dict(own_lengths=cache.lengths, context_mark=cache.context_mark)
                                                   if started else dict(writes=writes.astype(np.int32)))
    flat, layout = segment.pack(host)
    outer = layer_prefill.outer_params(params)
    x, cache, host = segment.run(params, outer, cfg, cache, jax.device_put(flat, lead.sharding), layout,
                                 first_writes if started else None, plan=plan, compress=compress, context=context,
                                 context_blocks=context_blocks(cfg, context, batch * plan.chunk) if flash else None)
    if started:
        cache = cache.replace(lengths=host["own_lengths"], context_mark=host["context_mark"])
    return layer_prefill._head(outer, x, host["lengths"], cfg=cfg), cache


def _check_growth_fits(cfg: ModelConfig, plan, batch: int, itemsize: int, lengths: np.ndarray, reserve: int) -> None:
    """Raises ValueError (one line, naming the segment and the tokens to generate) when the grown cache
    alone, every layer at its new width, exceeds the free device memory (`memory.free_bytes`); without
    this the allocation fails inside the compiled program, or later, when the result is read. On a mesh,
    `cfg` and `batch` are one device's share (`sharding.per_device`)."""
    free = memory.free_bytes()
    per_slot = batch * cfg.num_kv_heads * (2 * cfg.head_dim * itemsize + 4)        # k, v and a position
    need = per_slot * sum(plan.widths)
    if free is not None and need > free:
        raise ValueError(f"the grown cache needs {memory.format_bytes(need)} ({max(plan.widths)} slots per layer "
                         f"for {int(lengths.max())} new tokens{f' + {reserve} to generate' if reserve else ''}, "
                         f"batch {batch}), but {memory.format_bytes(free)} are free ({memory.BUDGET_ENV} or the "
                         f"device); ask for fewer tokens or compress the cache")


def _own_cache(cfg: ModelConfig, context: kv.KVCache, next_pos: np.ndarray, dtype,
               placement) -> tuple[kv.KVCache, jax.Array]:
    """An empty cache of one row per entry of `next_pos [B]` (the position after `context`'s, on the host),
    marked with the context's fingerprint, and its layers' next slots `[L, B]` (zeros) on `placement`. Its
    layers hold no slots, so they share one zero-width array. The leaves that the new cache never holds
    (the zero-width layers and the write slots, which extend's programs widen or read; end and next_pos,
    which `segment.run` replaces) are device arrays made once per shape (`_own_constants`) and per
    context (`_remembered`), so a question's call does not transfer them again; the two the new cache
    keeps (lengths and context_mark) are fresh NumPy arrays, which `extend` sends with its tokens (a
    decode loop may donate them)."""
    batch = len(next_pos)
    empty, no_pos, end, writes = _own_constants(batch, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers,
                                                jnp.dtype(dtype), placement)
    on_device = _remembered(("own next_pos", batch, placement), (context.next_pos,),
                            lambda: jax.device_put(np.asarray(next_pos, np.int32), placement))
    n = cfg.num_layers
    return kv.KVCache(k=(empty,) * n, v=(empty,) * n, pos=(no_pos,) * n, end=end, next_pos=on_device,
                      lengths=np.zeros(batch, np.int32), prompt_slots=(0,) * n, on_context=True,
                      context_mark=np.full(batch, context_fingerprint(context), np.uint32)), writes


@functools.lru_cache(maxsize=16)
def _own_constants(batch: int, kv_heads: int, head_dim: int, layers: int, dtype, placement):
    """(zero-width K/V `[B, K, 0, D]`, zero-width positions `[B, K, 0]`, zeros `[B]`, zeros `[L, B]`) on
    `placement`, all int32 but the K/V: read-only inputs of every question started on a context."""
    return tuple(jax.device_put([np.zeros((batch, kv_heads, 0, head_dim), dtype), np.zeros((batch, kv_heads, 0), np.int32),
                                 np.zeros(batch, np.int32), np.zeros((layers, batch), np.int32)], placement))


def _host_state(cache: kv.KVCache, context: kv.KVCache | None) -> tuple[np.ndarray, np.ndarray]:
    """(next positions `[B]`, every layer's next slot `[L, B]`) of `cache` on the host, fetched in one
    transfer (a transfer waits for all device work queued before it: on an H200 each cost extend ~0.3 ms
    or more). Raises as `_check_pairing` does, and with a `context`, whose transfer also brings each row's
    lowest held position and the fingerprint of the context it was started on, as `_check_follows` does."""
    _check_pairing(cache, context)
    lowest = None if context is None else _lowest_positions(cache.pos, cache.next_pos)
    next_pos, slots, lowest, marks = jax.device_get((cache.next_pos, (cache.end, cache.lengths, cache.offsets),
                                                     lowest, cache.context_mark))
    if context is not None:
        _check_follows(context, np.asarray(lowest), None if marks is None else np.asarray(marks))
    return np.asarray(next_pos), kv.host_write_slots(cache, slots)


def _growth(cache: kv.KVCache, writes: np.ndarray, lengths: np.ndarray, reserve: int, max_slots,
            generated: int = 0) -> int:
    """Empty slots to add to every layer so each row's segment and `reserve` more fit, given every
    layer's next slot `writes [L, B]`: 0 when they already do, else enough to bring the widest layer to
    a width bucket (at most `max_slots`). `generated`: tokens `generate` will sample after the segment, of
    which it caches all but the last, so only `generated - 1` of the reserve (its decode budget, a width
    bucket) must fit: past `max_slots` the reserve shrinks to them. Raises ValueError naming the numbers
    when the cache must grow past `max_slots` for the segment and those tokens."""
    widths = np.array([k.shape[2] for k in cache.k])                              # [L]
    after = writes + lengths[None, :] - widths[:, None]                           # [L, B] slots short, no reserve
    short = int((after + reserve).max())
    widest = int(widths.max())
    over = int((after + (min(reserve, generated - 1) if generated else reserve)).max())  # what must fit
    if max_slots is not None and over > 0 and widest + over > max_slots:
        asked = f" + {generated} to generate, the last not cached" if generated else ""
        raise ValueError(f"the cache needs {widest + over} slots for this segment ({int(lengths.max())} new "
                         f"tokens{asked}; {widest} allocated), more than max_slots={max_slots}")
    if short <= 0:
        return 0
    target = bucket_width(widest + short)
    return max((target if max_slots is None else min(target, max_slots)) - widest, 0)


# --- decode --------------------------------------------------------------------------------------

def _decode_impl(params, tokens, cache, context=None, context_blocks=None, *, cfg, flash_context=False):
    return _apply(params, cfg, tokens, cache, context, None, False, flash_context, context_blocks, method=Llama.decode)


_decode = jax.jit(_decode_impl, static_argnames=("cfg", "flash_context"))
_decode_donated = jax.jit(_decode_impl, static_argnames=("cfg", "flash_context"), donate_argnames=("cache",))


def context_flash(params, cfg: ModelConfig, context) -> bool:
    """Whether attention over `context` may take cuDNN flash attention: a GPU, bf16/fp16 params, no
    sliding window, and in every layer the occupied slots a prefix shared by all KV heads (a prefill's
    context is; holes of per-head budgets, Ada-KV's, are not), on one device: a context on a mesh (where
    `check_context_mesh` has put the call too) takes the `jnp` path, since the cuDNN call's partitioning
    over a mesh has not run on several GPUs. The slot check waits for the device, so its answer is
    remembered per context (`_remembered`)."""
    dtype = sharding.lead_param(params).dtype
    if (context is None or resolve_implementation(None, dtype) != "cudnn" or cfg.sliding_window is not None
            or sharding.array_mesh(context.k[0]) is not None):
        return False
    return _remembered("prefixes", context.pos, lambda: bool(_occupied_prefixes(context.pos)))


def context_blocks(cfg: ModelConfig, context: kv.KVCache, queries: int) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """Per layer, the key blocks cuDNN splits the shared `context` into for `queries` query rows
    (`slot_attention.flash_blocks`), computed once per context and query count by one program and
    remembered (`_remembered`): computed inside extend's and decode_step's programs they were a few small
    kernels per layer that the host launched on every call (the decode loop computes them once per loop
    likewise)."""
    return _remembered(("flash blocks", cfg.num_heads, queries), context.pos,
                       lambda: _flash_blocks(context.pos, heads=cfg.num_heads, queries=queries))


@functools.partial(jax.jit, static_argnames=("heads", "queries"))
def _flash_blocks(pos, *, heads: int, queries: int):
    return tuple(slot_attention.flash_blocks(p, heads, queries) for p in pos)


def context_next_pos(context: kv.KVCache) -> np.ndarray:
    """The shared `context`'s next position `[1]` on the host (read-only), fetched once per context
    (`_remembered`), so calls that start rows on a context do not wait for the device."""
    def fetch():
        host = np.array(jax.device_get(context.next_pos))
        host.setflags(write=False)
        return host
    return _remembered("next_pos", (context.next_pos,), fetch)


def _remembered(kind: str, arrays, compute):
    """`compute()`, a fact about the jax `arrays` (immutable; or frozen objects holding them, as a KVCache),
    computed once while they are alive: keyed by `kind` and the arrays' identities, each checked through
    a weak reference, so new arrays (even ones reusing a freed array's id) are computed afresh; a
    `compute()` that raises is not remembered. For a shared context's facts, which would otherwise
    make every call that uses the context wait for the device."""
    key = (kind, *map(id, arrays))
    hit = _MEMO.get(key)
    if hit is not None and all(r() is a for r, a in zip(hit[0], arrays)):
        return hit[1]
    value = compute()
    for old in [k for k, (refs, _) in list(_MEMO.items()) if any(r() is None for r in refs)]:
        _MEMO.pop(old, None)
    _MEMO[key] = (tuple(map(weakref.ref, arrays)), value)
    return value


# _remembered's facts: (kind, the arrays' ids) -> (weak references to the arrays, the fact).
_MEMO: dict[tuple, tuple[tuple[weakref.ref, ...], Any]] = {}


@jax.jit
def _occupied_prefixes(pos):
    """True when in every layer `[1, K, S]` the occupied slots are one prefix shared by the KV heads."""
    def one(p):
        held = p[0] >= 0                                                           # [K, S]
        count = jnp.sum(held[0])
        return jnp.all(held == (jnp.arange(held.shape[1]) < count)[None, :])
    return jnp.all(jnp.stack([one(p) for p in pos]))


def check_decode(cfg: ModelConfig, next_tokens, cache: kv.KVCache, context: kv.KVCache | None = None) -> np.ndarray:
    """Validates a decode step's inputs on the host, waiting for the device once; returns `next_tokens`
    as int32. Raises ValueError for a bad shape or token, a full cache, a position past
    max_position_embeddings, or (with a shared `context`) a cache that does not follow it."""
    refuse_traced(next_tokens, "next_tokens")
    next_tokens = np.asarray(next_tokens)
    if next_tokens.shape != (cache.batch,):
        raise ValueError(f"next_tokens must have shape ({cache.batch},), got {next_tokens.shape}")
    if not np.issubdtype(next_tokens.dtype, np.integer):
        raise ValueError(f"next_tokens must be integers, got dtype {next_tokens.dtype}")
    if (next_tokens < 0).any() or (next_tokens >= cfg.vocab_size).any():
        raise ValueError(f"next_tokens {next_tokens.tolist()} outside the vocabulary [0, {cfg.vocab_size})")
    next_pos, writes = _host_state(cache, context)
    free = free_slots(cache, writes)
    if (free < 1).any():
        row = int(np.argmin(free))
        raise ValueError(f"the KV cache is full: row {row} has used all {cache.slots} slots of a layer; "
                         f"{'extend' if cache.on_context else 'prefill'} with a larger max_slots (or extend "
                         f"without one, which grows the cache)")
    _check_positions(cfg, int(next_pos.max()) + 1, "decoding")
    return next_tokens.astype(np.int32)


def free_slots(cache: kv.KVCache, writes: np.ndarray | None = None) -> np.ndarray:
    """`[B]` empty slots after each row's next slot, in its fullest layer (host arrays). `writes`: every
    layer's next slot `[L, B]`, when the caller has fetched it."""
    writes = kv.host_write_slots(cache) if writes is None else writes            # [L, B]
    widths = np.array([k.shape[2] for k in cache.k])[:, None]                     # [L, 1]
    return (widths - writes).min(axis=0)


def decode_step(params: Params, cfg: ModelConfig, next_tokens, cache: kv.KVCache, *,
                donate: bool = False, context: kv.KVCache | None = None, mesh=None) -> tuple[jax.Array, kv.KVCache]:
    """Feeds one token per row (`next_tokens [B]`); returns logits `[B, V]` and the cache with that token
    appended at each layer's next slot (`cache.write_slots`), position `next_pos[b]`.

    `donate=True` lets XLA update the cache in place (the passed cache is then unusable); without it the
    step copies the cache, which is what an immutable value costs. Raises ValueError when a row's cache
    is full (prefill with a larger `max_slots`) or a row would pass max_position_embeddings. `mesh`: as
    in `prefill` (the cache is moved onto it, split by row and KV head, when it is not there yet).
    `context`: a batch-1 cache every row also attends to, as in `extend(..., context=)`.
    """
    check_flag(donate, "donate")
    check_params(params, cfg)
    check_cache(params, cfg, cache)
    params, mesh = _on_mesh(params, cfg, mesh, cache.batch)
    check_context(params, cfg, context)
    check_context_mesh(context, mesh)
    next_tokens = check_decode(cfg, next_tokens, cache, context)
    if mesh is not None:
        (next_tokens,) = sharding.place_rows(mesh, next_tokens)
    cache = sharding.place_cache(cache, mesh)
    step = _decode_donated if donate else _decode
    flash = context_flash(params, cfg, context)
    return step(params, next_tokens, cache, context, context_blocks(cfg, context, cache.batch) if flash else None,
                cfg=cfg, flash_context=flash)


# --- generate ------------------------------------------------------------------------------------

def check_seed(seed) -> None:
    """Raises ValueError unless `seed` is an integer in [0, 2**32) (what `jax.random.key` takes)."""
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {_show(seed)}")


def check_generation(cfg: ModelConfig, longest_prompt: int | None, max_new_tokens, temperature, top_k, top_p,
                     eos_id, seed) -> None:
    """Raises ValueError naming the first bad generation argument. The last generated token is never fed
    back, so a prompt of L tokens and N new ones use positions 0 .. L + N - 2. `longest_prompt` None:
    the prompt is not known yet, and only max_new_tokens is checked against the positions."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {_show(max_new_tokens)}")
    if not finite_real(temperature) or not temperature >= 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {_show(temperature)}")
    if not _is_int(top_k) or top_k < 0 or top_k > cfg.vocab_size:
        raise ValueError(f"top_k must be an integer in [0, {cfg.vocab_size}], got {_show(top_k)}")
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {_show(top_p)}")
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < cfg.vocab_size):
        raise ValueError(f"eos_id={_show(eos_id)} must be a token id in [0, {cfg.vocab_size})")
    check_seed(seed)
    if longest_prompt is None:
        _check_positions(cfg, max_new_tokens, "max_new_tokens alone")
    else:
        _check_positions(cfg, longest_prompt + max_new_tokens - 1, "the prompt plus max_new_tokens")


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, *, greedy: bool,
           top_k: int, use_top_p: bool) -> jax.Array:
    """Next tokens `[B]` from logits `[B, V]`: argmax when `greedy` (the lowest index among tied maxima),
    else a draw from softmax(logits / temperature) restricted to the `top_k` largest (0 = all), then to
    the smallest set of those whose renormalised probability reaches `top_p` (nucleus sampling; HF's
    warper order). Both cut at a logit value, so a token tied with the last one kept is kept too: with
    exact ties (e.g. bf16 logits) the set can be larger than k or than the smallest nucleus."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]                            # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]                       # [B, V] descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs                              # mass of better tokens
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _decode_loop(params, logits, cache, context, max_new_tokens, seed, temperature, top_p, eos_id, *, cfg,
                 budget, greedy, top_k, use_top_p, decode_compress=None, interval=0, flash_context=False):
    """Samples the first token from the prefill's `logits [B, V]`, then decodes until every row has
    emitted `eos_id` or `max_new_tokens` (traced, <= `budget`, the static size of the token buffer).
    A row that has stopped appends nothing more, so the final cache holds each row's prompt and every
    generated token but its last. `context`: a shared batch-1 cache every row attends to, or None.
    `decode_compress`: a method re-selecting each row's slots every `interval` appended tokens
    (decode_compress.py)."""
    pick = functools.partial(sample, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    b = logits.shape[0]
    pad = jnp.maximum(eos_id, 0)
    key, sub = jax.random.split(jax.random.key(seed))
    tok = pick(logits, sub, temperature, top_p)                                  # [B]
    out = jnp.full((b, budget), pad, jnp.int32).at[:, 0].set(tok)               # [B, N]
    squeeze = None
    if decode_compress is not None:
        cache = decode_compress_lib.with_offsets(cache)
        squeeze = decode_compress_lib.init(cfg, cache, decode_compress, cache.k[0].dtype)
    state = (jnp.int32(1), tok, tok == eos_id, jnp.ones((b,), jnp.int32), out, cache, key, squeeze)
    # the context's key blocks, once: recomputed inside the loop they cost 64 tiny kernels per 7B step
    blocks = (_flash_blocks(context.pos, heads=cfg.num_heads, queries=b)
              if context is not None and flash_context else None)

    def cond(state):
        i, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, done, n, out, cache, key, squeeze = state
        if squeeze is None:
            logits, cache = _apply(params, cfg, tok, cache, context, ~done, False, flash_context, blocks,
                                   method=Llama.decode)
        else:
            position = cache.next_pos
            logits, cache, seen = _apply(params, cfg, tok, cache, None, ~done, True, method=Llama.decode)
            squeeze = decode_compress_lib.observe(squeeze, seen, cache, position, ~done)
        cache = kv.row_major(cache)
        key, sub = jax.random.split(key)
        tok = jnp.where(done, pad, pick(logits, sub, temperature, top_p))
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        n = n + (~done).astype(jnp.int32)
        return i + 1, tok, done | (tok == eos_id), n, out, cache, key, squeeze

    if squeeze is None:
        _, _, _, n, out, cache, _, _ = jax.lax.while_loop(cond, body, state)
        return GenerateOutput(tokens=out, lengths=n, cache=cache)

    def block(state):
        """`interval` steps, then the rows that appended all of them re-select. Rows advance in step
        (a stopped row appends nothing more), so every row is due at a block's end or never again; the
        steps themselves carry no conditional, which would copy the cache each step."""
        state, _ = jax.lax.while_loop(lambda s: cond(s[0]) & (s[1] < interval), lambda s: (body(s[0]), s[1] + 1),
                                      (state, jnp.int32(0)))
        *head, cache, key, squeeze = state
        cache, squeeze = decode_compress_lib.reselect(cfg, cache, squeeze, decode_compress, interval)
        cache = kv.row_major(cache)
        return (*head, cache, key, squeeze)

    _, _, _, n, out, cache, _, _ = jax.lax.while_loop(cond, block, state)
    return GenerateOutput(tokens=out, lengths=n, cache=cache)


@functools.cache
def _decode_loop_program():
    # The prefill's cache is a fresh intermediate: donating it lets the loop update it in place. GPU only,
    # as the CPU suite has always run (jax 0.10.2's CPU client can donate too); tests/test_extend.py checks
    # continuations by the buffers they hand over instead.
    donate = ("cache",) if jax.default_backend() != "cpu" else ()
    return jax.jit(_decode_loop, static_argnames=("cfg", "budget", "greedy", "top_k", "use_top_p",
                                                  "decode_compress", "interval", "flash_context"),
                   donate_argnames=donate)


def generate(params: Params, cfg: ModelConfig, tokens, lengths=None, *, max_new_tokens: int,
             compress: Method | None = None, chunk: int | str | None = "auto", temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None, seed: int = 0,
             snap_impl: str = "auto", implementation: str | None = None,
             bucket: bool = True, context: kv.KVCache | None = None, cache: kv.KVCache | None = None,
             max_slots: int | None = None, decode_compress: Method | None = None, interval: int = 128,
             mesh=None) -> GenerateOutput:
    """Generates up to `max_new_tokens` per row after right-padded prompts `tokens [B, T]`.

    `compress`: a compression method for the prompt's KV (see `prefill`), None for the full cache.
    `temperature=0` is greedy; otherwise samples with optional `top_k` / `top_p` (`sample`: top-k, then
    the nucleus of the renormalised k; tokens tied with the last one kept are kept). A row stops after
    emitting `eos_id` (later entries hold the pad id, `max(eos_id, 0)`), the loop when all rows stopped.
    The same `seed` gives the same tokens for the same batch (one key per step draws every row's token,
    so a sampled row also depends on its batch-mates). The prompt is padded to `bucket_width(T)` and the
    decode buffer to `bucket_width(max_new_tokens)` (unless `bucket=False`), so nearby prompt lengths and
    token counts share compiled programs. Without compression (or for prompts within its capacity) the
    padded slots stay in the cache, masked, and every decode step reads them: up to 1.5x the KV bytes of
    an unpadded cache (for prompts of 32 tokens or more; a shorter one pads to 32). Use `bucket=False`
    when timing decode. `mesh`: as in `prefill`.

    `context`: a batch-1 cache of one shared document (from `prefill`, compressed or not); `tokens` are
    then Q questions about it, appended by `extend(..., context=)` to the rows' own slots, and every
    attention reads the context's K/V once for all rows. `cache`: continue from a cache instead of a
    fresh prefill (the `out.cache` of an earlier call, whose rows hold everything but their last
    generated token: start the next segment with it); `compress` then re-compresses it after the new
    tokens (as `extend` does), and `max_slots` bounds its growth (passing `max_slots` without `cache` or
    `context` is an error: a fresh prefill sizes its cache itself). With `context`, `cache` holds the
    rows' own slots. The final `out.cache` is the per-row state to continue each conversation. A
    continuation runs `extend`'s kernels: `implementation` and `snap_impl` (a fresh prefill's) must stay
    at their defaults there.

    `decode_compress`: a method (SnapKV, StreamingLLM, H2O, ...) that keeps every row's cache bounded
    while it generates: whenever a row has appended `interval` tokens since its last selection, each
    layer re-selects the method's capacity over its live cache (decode_compress.py), so a layer holds at
    most max(prompt slots, capacity) + interval slots. `compress` still compresses the prompt.
    """
    check_flag(bucket, "bucket")
    check_params(params, cfg)
    _check_decode_compress(cfg, decode_compress, interval, context)
    check_continuation(params, cfg, cache, context, max_slots)
    _check_backends(cfg, implementation, snap_impl)
    if context is not None or cache is not None:
        if implementation is not None or snap_impl != "auto":
            raise ValueError(f"implementation={implementation!r} and snap_impl={snap_impl!r} choose a fresh "
                             f"prefill's kernels; a continuation (cache= or context=) runs extend's, which "
                             f"picks them itself: leave both at their defaults")
        return _continue(params, cfg, tokens, lengths, cache, context, max_new_tokens=max_new_tokens,
                         compress=compress, chunk=chunk, temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_id=eos_id, seed=seed, bucket=bucket, max_slots=max_slots, mesh=mesh,
                         decode_compress=decode_compress, interval=interval)
    _check_compress(cfg, compress)
    _check_chunk(chunk)
    tokens, lengths = _as_prompt(cfg, tokens, lengths)
    check_generation(cfg, int(lengths.max()), max_new_tokens, temperature, top_k, top_p, eos_id, seed)
    _check_prompt_positions(cfg, int(lengths.max()), compress)
    max_new_tokens, top_k = int(max_new_tokens), int(top_k)  # NumPy integers too
    budget = max_new_tokens
    if bucket:
        width = bucket_width(tokens.shape[1])
        tokens = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))
        budget = bucket_width(max_new_tokens)
    params, mesh = _on_mesh(params, cfg, mesh, tokens.shape[0])
    extra = budget
    if decode_compress is not None:  # room for `interval` tokens above the larger of prompt and capacity
        widths = layer_prefill.prompt_widths(cfg, tokens.shape[1], compress)
        extra = min(budget, decode_compress_lib.slots_needed(cfg, widths, decode_compress, interval))
    plan = plan_prefill(params, cfg, tokens, compress, chunk, extra, implementation, mesh)
    logits, cache = _run_prefill(params, cfg, tokens, lengths, plan, compress, snap_impl, implementation, mesh)
    return _run_decode_loop(params, cfg, logits, cache, None, max_new_tokens, budget, temperature, top_k, top_p,
                            eos_id, seed, decode_compress, interval)


def _check_decode_compress(cfg: ModelConfig, method, interval, context) -> None:
    """Raises ValueError for a bad `decode_compress` / `interval` pair, before anything runs (a bad
    `interval` also without a method: the value is wrong whatever it would apply to), or a method with a
    shared `context`."""
    if not _is_int(interval) or not 1 <= interval < 2**31:
        raise ValueError(f"interval must be a positive integer below 2**31, got {_show(interval)}")
    if method is None:
        return
    _check_compress(cfg, method, "decode_compress")
    if not method.reselects_live:
        raise ValueError(f"{type(method).__name__} cannot re-select a live cache (decode_compress=)")
    window = max(method.observation_window, getattr(method, "window", 0))
    if interval < window:
        raise ValueError(f"interval={interval} is shorter than the method's window={window}: the window "
                         f"must be generated tokens")
    if context is not None:
        raise ValueError("decode_compress= with context= is not supported: the rows' own slots stay whole")


def _run_decode_loop(params, cfg, logits, cache, context, max_new_tokens, budget, temperature, top_k, top_p,
                     eos_id, seed, decode_compress=None, interval=0) -> GenerateOutput:
    out = _decode_loop_program()(
        params, logits, cache, context, np.int32(max_new_tokens), np.uint32(seed),
        np.float32(max(temperature, 1e-6)), np.float32(top_p), np.int32(-1 if eos_id is None else eos_id),
        cfg=cfg, budget=budget, greedy=temperature == 0.0, top_k=top_k, use_top_p=top_p < 1.0,
        decode_compress=decode_compress, interval=int(interval) if decode_compress is not None else 0,
        flash_context=context_flash(params, cfg, context))
    if budget > max_new_tokens:
        out = out.replace(tokens=out.tokens[:, :max_new_tokens])
    return out


def _continue(params, cfg, tokens, lengths, cache, context, *, max_new_tokens, compress, chunk, temperature,
              top_k, top_p, eos_id, seed, bucket, max_slots, mesh, decode_compress, interval) -> GenerateOutput:
    """`generate` from an existing cache and/or a shared context: `extend`, then the decode loop."""
    tokens_np, lengths_np = _as_prompt(cfg, tokens, lengths)
    # rows continuing a cache: extend checks their positions once it has fetched them (one transfer)
    start = context_next_pos(context) if cache is None and isinstance(context, kv.KVCache) else 0
    check_generation(cfg, None if cache is not None else int((start + lengths_np).max()), max_new_tokens,
                     temperature, top_k, top_p, eos_id, seed)
    max_new_tokens, top_k = int(max_new_tokens), int(top_k)
    budget = bucket_width(max_new_tokens) if bucket else max_new_tokens
    reserve = budget
    if decode_compress is not None:
        reserve = min(budget, decode_compress.max_slots(cfg.num_layers) + interval)
    logits, own = _extend(params, cfg, cache, tokens_np, lengths_np, compress=compress, max_slots=max_slots,
                          chunk=chunk, context=context, mesh=mesh, reserve=reserve, what="the prompt",
                          generated=max_new_tokens)
    cache = kv.unaliased(own, cache, context)  # the loop donates its cache; the caller's stays usable
    return _run_decode_loop(params, cfg, logits, cache, context, max_new_tokens, budget, temperature, top_k,
                            top_p, eos_id, seed, decode_compress, interval)
