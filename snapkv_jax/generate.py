"""Public entry points: `forward`, `prefill`, `decode_step`, `generate`.

Each is a thin Python function that validates its inputs (DESIGN section 6: a `ValueError` naming the bad
value, before anything is traced) and then calls a jitted implementation with the configs static.

`generate` is one jitted program: prefill (with SnapKV when `snap` is given), then a `lax.while_loop` of
decode steps with sampling and per-row EOS stopping. The cache is the while-loop's carry inside that
program, so XLA updates it in place (no copy per step); the final cache is returned for study. Prompt
widths are bucketed (see `bucket_width`) so that a notebook calling it with many prompt lengths compiles
once per bucket, not once per length.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from snapkv_jax import cache as kv
from snapkv_jax import snapkv
from snapkv_jax.config import ModelConfig, SnapKVConfig
from snapkv_jax.models.llama import Llama

Params = Any
_MIN_BUCKET = 32
_ATTENTION_IMPLS = (None, "xla", "cudnn")  # jax.nn.dot_product_attention's `implementation`


@flax.struct.dataclass
class GenerateOutput:
    tokens: jax.Array    # [B, N] generated tokens; after a row's EOS, filled with the pad id
    lengths: jax.Array   # [B] generated tokens per row, its EOS included
    cache: kv.KVCache    # the final cache: which prompt positions each layer kept, for study


def bucket_width(t: int) -> int:
    """The padded prompt width for a prompt of `t` tokens: the smallest of 32, 48, 64, 96, 128, 192, ...
    (powers of two and 1.5x powers of two) that holds it. Two buckets per octave waste at most a third of
    the prefill on padding while compiling only ~2 programs per doubling of prompt length."""
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


def _as_prompt(cfg: ModelConfig, tokens, lengths) -> tuple[np.ndarray, np.ndarray]:
    """Checks tokens `[B, T]` and lengths `[B]` on the host; returns them as int32 NumPy arrays, with
    every padding entry set to token 0. Padding is never attended to by real tokens, but its K/V fills
    the padding slots, where an out-of-vocabulary id would embed as NaN and 0 x NaN poisons attention."""
    tokens = np.asarray(tokens)
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


def _check_snap(snap):
    if snap is not None and not isinstance(snap, SnapKVConfig):
        raise ValueError(f"snap must be a snapkv_jax.SnapKVConfig or None, got {type(snap).__name__}")


def _check_backends(cfg: ModelConfig, implementation, snap_impl=None) -> None:
    """Raises ValueError for an unknown attention `implementation` or SnapKV `snap_impl`, before jit."""
    if implementation not in _ATTENTION_IMPLS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; use one of {_ATTENTION_IMPLS}")
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"implementation='cudnn' needs a GPU; this backend is {jax.default_backend()!r}")
    if snap_impl is not None:
        snapkv.resolve_impl(snap_impl, cfg.head_dim)


def prompt_slots(width: int, snap: SnapKVConfig | None) -> int:
    """Slots one layer's prompt occupies after prefill of a `width`-wide batch: width, or the SnapKV
    capacity when the batch is wider than it."""
    return snap.capacity if snap is not None and width > snap.capacity else width


def _apply(params, cfg: ModelConfig, *args, method):
    """`Llama(cfg).apply` under jit. float32 params get float32 matmuls on every backend: on GPUs, XLA's
    default precision runs float32 dots in TF32, measured on an H100 at up to 4e-3 from HF's float32
    logits. bfloat16 params keep the default (bf16 tensor-core dots)."""
    float32 = jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
    with jax.default_matmul_precision("float32" if float32 else None):
        return Llama(cfg).apply({"params": params}, *args, method=method)


# --- forward -------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("cfg", "implementation"))
def _forward(params, tokens, cfg, implementation):
    return _apply(params, cfg, tokens, implementation, method=Llama.forward)


def forward(params: Params, cfg: ModelConfig, tokens, *, implementation: str | None = None) -> jax.Array:
    """Logits `[B, T, V]` (float32) of a full causal pass over `tokens [B, T]`, no cache.

    `implementation` picks `jax.nn.dot_product_attention`'s backend (None: cuDNN on GPU where possible).
    """
    tokens, _ = _as_prompt(cfg, tokens, None)
    _check_positions(cfg, tokens.shape[1], "the prompt")
    _check_backends(cfg, implementation)
    return _forward(params, tokens, cfg=cfg, implementation=implementation)


# --- prefill -------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("cfg", "slots", "snap", "snap_impl", "implementation"))
def _prefill(params, tokens, lengths, cfg, slots, snap, snap_impl, implementation):
    return _apply(params, cfg, tokens, lengths, slots, snap, snap_impl, implementation, method=Llama.prefill)


def prefill(params: Params, cfg: ModelConfig, tokens, lengths=None, *, max_slots: int | None = None,
            snap: SnapKVConfig | None = None, snap_impl: str = "auto",
            implementation: str | None = None) -> tuple[jax.Array, kv.KVCache]:
    """Runs right-padded prompts `tokens [B, T]` (row b's real length `lengths[b]`, default T) through
    the model. Returns the logits of each row's last real token `[B, V]` and a KVCache of `max_slots`
    slots (default: exactly what the prompt needs). With `snap`, each layer keeps `snap.capacity` slots
    per KV head for rows longer than the capacity (SnapKV); shorter rows are untouched.

    Raises ValueError for an empty prompt, lengths beyond the width, tokens outside the vocabulary, a
    prompt longer than the model's positions, or `max_slots` smaller than the prompt needs.
    """
    _check_snap(snap)
    _check_backends(cfg, implementation, snap_impl)
    tokens, lengths = _as_prompt(cfg, tokens, lengths)
    _check_positions(cfg, int(lengths.max()), "the prompt")
    needed = prompt_slots(tokens.shape[1], snap)
    if max_slots is not None and not _is_int(max_slots):
        raise ValueError(f"max_slots must be an integer, got {max_slots!r}")
    slots = needed if max_slots is None else int(max_slots)
    if slots < needed:
        raise ValueError(f"max_slots={max_slots} is smaller than the {needed} slots this prompt needs")
    return _prefill(params, tokens, lengths, cfg=cfg, slots=slots, snap=snap, snap_impl=snap_impl,
                    implementation=implementation)


# --- decode --------------------------------------------------------------------------------------

def _decode_impl(params, tokens, cache, cfg):
    return _apply(params, cfg, tokens, cache, method=Llama.decode)


_decode = jax.jit(_decode_impl, static_argnames=("cfg",))
_decode_donated = jax.jit(_decode_impl, static_argnames=("cfg",), donate_argnames=("cache",))


def decode_step(params: Params, cfg: ModelConfig, next_tokens, cache: kv.KVCache, *,
                donate: bool = False) -> tuple[jax.Array, kv.KVCache]:
    """Feeds one token per row (`next_tokens [B]`); returns logits `[B, V]` and the cache with that token
    appended at slot `end[b]`, position `next_pos[b]`.

    `donate=True` lets XLA update the cache in place (the passed cache is then unusable); without it the
    step copies the cache, which is what an immutable value costs. Raises ValueError when a row's cache
    is full (prefill with a larger `max_slots`) or a row would pass max_position_embeddings.
    """
    next_tokens = np.asarray(next_tokens)
    if next_tokens.shape != (cache.batch,):
        raise ValueError(f"next_tokens must have shape ({cache.batch},), got {next_tokens.shape}")
    if not np.issubdtype(next_tokens.dtype, np.integer):
        raise ValueError(f"next_tokens must be integers, got dtype {next_tokens.dtype}")
    if (next_tokens < 0).any() or (next_tokens >= cfg.vocab_size).any():
        raise ValueError(f"next_tokens {next_tokens.tolist()} outside the vocabulary [0, {cfg.vocab_size})")
    end, next_pos = jax.device_get((cache.end, cache.next_pos))  # both copies start before either waits
    if (end >= cache.slots).any():
        row = int(np.argmax(end))
        raise ValueError(f"the KV cache is full: row {row} has used all {cache.slots} slots; "
                         f"prefill with a larger max_slots")
    _check_positions(cfg, int(next_pos.max()) + 1, "decoding")
    step = _decode_donated if donate else _decode
    return step(params, next_tokens.astype(np.int32), cache, cfg=cfg)


# --- generate ------------------------------------------------------------------------------------

def check_generation(cfg: ModelConfig, longest_prompt: int, max_new_tokens, temperature, top_k, top_p,
                     eos_id, seed) -> None:
    """Raises ValueError naming the first bad generation argument. The last generated token is never fed
    back, so a prompt of L tokens and N new ones use positions 0 .. L + N - 2."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not _is_real(temperature) or not temperature >= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not _is_int(top_k) or top_k < 0 or top_k > cfg.vocab_size:
        raise ValueError(f"top_k must be an integer in [0, {cfg.vocab_size}], got {top_k!r}")
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < cfg.vocab_size):
        raise ValueError(f"eos_id={eos_id!r} must be a token id in [0, {cfg.vocab_size})")
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    _check_positions(cfg, longest_prompt + max_new_tokens - 1, "the prompt plus max_new_tokens")


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, *, greedy: bool,
           top_k: int, use_top_p: bool) -> jax.Array:
    """Next tokens `[B]` from logits `[B, V]`: argmax when `greedy`, else a draw from
    softmax(logits / temperature) restricted to the `top_k` largest (0 = all) and to the smallest set whose
    probability reaches `top_p` (nucleus sampling)."""
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


@functools.partial(jax.jit, static_argnames=("cfg", "slots", "max_new_tokens", "snap", "greedy", "top_k",
                                             "use_top_p", "snap_impl", "implementation"))
def _generate(params, tokens, lengths, seed, temperature, top_p, eos_id, *, cfg, slots, max_new_tokens,
              snap, greedy, top_k, use_top_p, snap_impl, implementation):
    pick = functools.partial(sample, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    logits, cache = _apply(params, cfg, tokens, lengths, slots, snap, snap_impl, implementation,
                           method=Llama.prefill)
    b = tokens.shape[0]
    pad = jnp.maximum(eos_id, 0)
    key, sub = jax.random.split(jax.random.key(seed))
    tok = pick(logits, sub, temperature, top_p)                                  # [B]
    out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)       # [B, N]
    state = (jnp.int32(1), tok, tok == eos_id, jnp.ones((b,), jnp.int32), out, cache, key)

    def cond(state):
        i, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, done, n, out, cache, key = state
        logits, cache = _apply(params, cfg, tok, cache, method=Llama.decode)
        key, sub = jax.random.split(key)
        tok = jnp.where(done, pad, pick(logits, sub, temperature, top_p))
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        n = n + (~done).astype(jnp.int32)
        return i + 1, tok, done | (tok == eos_id), n, out, cache, key

    _, _, _, n, out, cache, _ = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(tokens=out, lengths=n, cache=cache)


def generate(params: Params, cfg: ModelConfig, tokens, lengths=None, *, max_new_tokens: int,
             snap: SnapKVConfig | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | None = None, seed: int = 0, snap_impl: str = "auto",
             implementation: str | None = None, bucket: bool = True) -> GenerateOutput:
    """Generates up to `max_new_tokens` per row after right-padded prompts `tokens [B, T]`.

    `temperature=0` is greedy; otherwise samples with optional `top_k` / `top_p`. A row stops after
    emitting `eos_id` (later entries hold the pad id, `max(eos_id, 0)`), the loop when all rows stopped.
    The same `seed` gives the same tokens. The prompt is padded to `bucket_width(T)` (unless
    `bucket=False`) so nearby prompt lengths share one compiled program. Without SnapKV (or for prompts
    within its capacity) the padded slots stay in the cache, masked, and every decode step reads them: up to
    1.5x the KV bytes of an unpadded cache. Use `bucket=False` when timing decode.
    """
    _check_snap(snap)
    _check_backends(cfg, implementation, snap_impl)
    tokens, lengths = _as_prompt(cfg, tokens, lengths)
    check_generation(cfg, int(lengths.max()), max_new_tokens, temperature, top_k, top_p, eos_id, seed)
    if bucket:
        width = bucket_width(tokens.shape[1])
        tokens = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))
    max_new_tokens, top_k = int(max_new_tokens), int(top_k)  # NumPy integers too: static jit arguments
    slots = prompt_slots(tokens.shape[1], snap) + max_new_tokens
    return _generate(params, tokens, lengths, np.uint32(seed), np.float32(max(temperature, 1e-6)),
                     np.float32(top_p), np.int32(-1 if eos_id is None else eos_id), cfg=cfg, slots=slots,
                     max_new_tokens=max_new_tokens, snap=snap, greedy=temperature == 0.0, top_k=top_k,
                     use_top_p=top_p < 1.0, snap_impl=snap_impl, implementation=implementation)
