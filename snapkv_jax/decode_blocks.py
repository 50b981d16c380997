"""`generate`'s decode loop cut into jitted blocks of `block` steps, so that a caller can show tokens as
they come (the Sampler's `stream=True`).

`stream_generate` is `generate` made into a Python generator: the same prompt padding, the same prefill
(same width bucket, same empty slots) or, from a `cache=`, the same `extend`, the same sampling and the
same random key schedule: the key `jax.random.key(seed)` is split once for the first token and once per
later token, carried from block to block, so the tokens equal `generate`'s for the same arguments. The block program's step count is a
traced argument (<= the static `block`): the last, shorter block and every `max_new_tokens` reuse one
compiled program per (cache shape, block).

Invariants: a finished row (it emitted `eos_id`) gets the pad id `max(eos_id, 0)` from then on and
appends nothing more to the cache, as in `generate`; the last emitted token of every row is never fed
into the cache (`Decoding.token` holds it), so the final cache continues with `cache=` like generate's.
"""

from __future__ import annotations

import functools
from typing import Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from snapkv_jax import cache as kv
from snapkv_jax.generate import (_apply, _as_prompt, _check_chunk, _check_compress, _extend, _is_int,
                                 bucket_width, check_continuation, check_generation, check_params, prefill,
                                 prompt_slots, sample)
from snapkv_jax.compression import Method
from snapkv_jax.models.llama import Llama


@flax.struct.dataclass
class Decoding:
    """Where a block decode stands: the state `generate`'s while_loop carries, between two blocks."""

    token: jax.Array      # [B] int32 the last emitted token of each row, not yet in the cache
    done: jax.Array       # [B] bool: the row has emitted eos_id
    lengths: jax.Array    # [B] int32 tokens emitted per row, its EOS included
    cache: kv.KVCache     # holds every emitted token but `token`
    key: jax.Array        # the PRNG key the next token's draw splits from


def _first(logits, seed, temperature, top_p, eos_id, cache, *, greedy, top_k, use_top_p) -> Decoding:
    """Draws each row's first token from the prefill's `logits [B, V]` with generate's first key split."""
    key, sub = jax.random.split(jax.random.key(seed))
    tok = sample(logits, sub, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    return Decoding(token=tok, done=tok == eos_id, lengths=jnp.ones_like(tok), cache=cache, key=key)


def _block(params, state: Decoding, steps, temperature, top_p, eos_id, *, cfg, block, greedy, top_k,
           use_top_p):
    """Up to `steps` (traced, <= `block`) decode steps, fewer when every row is done. Returns the new
    state, the emitted tokens `[B, block]` (the first `ran` columns are this block's) and `ran`."""
    b = state.token.shape[0]
    pad = jnp.maximum(eos_id, 0)
    out = jnp.full((b, block), pad, jnp.int32)                                  # [B, block]

    def cond(carry):
        i, state, _ = carry
        return (i < steps) & ~jnp.all(state.done)

    def body(carry):  # the body of generate's _decode_loop, step for step
        i, s, out = carry
        logits, cache = _apply(params, cfg, s.token, s.cache, None, ~s.done, method=Llama.decode)
        key, sub = jax.random.split(s.key)
        drawn = sample(logits, sub, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
        tok = jnp.where(s.done, pad, drawn)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        s = Decoding(token=tok, done=s.done | (tok == eos_id), lengths=s.lengths + (~s.done).astype(jnp.int32),
                     cache=kv.row_major(cache), key=key)
        return i + 1, s, out

    ran, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
    return state, out, ran


_STATIC = ("greedy", "top_k", "use_top_p")
_first_program = jax.jit(_first, static_argnames=_STATIC)


@functools.cache
def _block_program():
    donate = ("state",) if jax.default_backend() != "cpu" else ()  # GPU only: see generate._decode_loop_program
    return jax.jit(_block, static_argnames=("cfg", "block") + _STATIC, donate_argnames=donate)


def stream_generate(params, cfg, tokens, lengths=None, *, max_new_tokens: int, compress: Method | None = None,
                    chunk="auto", temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    eos_id: int | None = None, seed: int = 0, cache: kv.KVCache | None = None,
                    max_slots: int | None = None, block: int = 8) -> Iterator[tuple[np.ndarray, Decoding]]:
    """`generate` as a generator of blocks: yields `(new [B, n] int32, state)` after the first token
    (n = 1) and after each block of at most `block` decode steps, `new` holding the tokens emitted in it
    (the pad id for finished rows). The concatenated `new` equal `generate(...).tokens` for the same
    arguments (the buffer past each row's `state.lengths` holds pad ids); the last `state.cache` is
    `generate`'s final cache. `cache`: continue from it through `extend` (then `compress` re-compresses
    it and `max_slots` bounds its growth), as `generate(..., cache=)` does; the given cache stays usable.
    A yielded state lasts until the next block is asked for: on a GPU that block updates its buffers in
    place (donation), so copy it (`jax.tree.map(jnp.copy, state)`) to branch from it later.

    Raises ValueError (before anything runs) for what `generate` refuses, `block` < 1, or a cache of rows
    started on a shared context (no `context=` here).
    """
    check_params(params, cfg)
    if not _is_int(block) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    _check_compress(cfg, compress)
    _check_chunk(chunk)
    tokens, lengths = _as_prompt(cfg, tokens, lengths)
    check_continuation(params, cfg, cache, None, max_slots)
    if cache is not None and cache.on_context:
        raise ValueError("this cache holds rows' own tokens after a shared context, which a stream cannot take: "
                         "continue them with generate(..., cache=, context=)")
    if cache is not None and cache.batch != tokens.shape[0]:
        raise ValueError(f"tokens have {tokens.shape[0]} rows but the cache has batch {cache.batch}")
    # a given cache's positions: extend checks them once it has fetched them (one transfer)
    check_generation(cfg, None if cache is not None else int(lengths.max()), max_new_tokens, temperature, top_k,
                     top_p, eos_id, seed)
    max_new_tokens, top_k = int(max_new_tokens), int(top_k)
    budget = bucket_width(max_new_tokens)
    if cache is None:  # generate's padding: the prompt to its width bucket, room for the token budget
        width = bucket_width(tokens.shape[1])
        tokens = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))
        slots = prompt_slots(cfg, width, compress) + budget
        logits, cache = prefill(params, cfg, tokens, lengths, max_slots=slots, compress=compress, chunk=chunk)
    else:  # generate(cache=)'s extend, leaving room for the budget
        logits, own = _extend(params, cfg, cache, tokens, lengths, compress=compress, max_slots=max_slots,
                              chunk=chunk, context=None, mesh=None, reserve=budget, what="the prompt",
                              generated=max_new_tokens)
        cache = kv.unaliased(own, cache)  # the blocks donate their state; the caller's cache stays usable
    return _blocks(params, cfg, logits, cache, max_new_tokens, temperature, top_k, top_p, eos_id, seed, block)


def _blocks(params, cfg, logits, cache, max_new_tokens, temperature, top_k, top_p, eos_id, seed, block):
    sampling = dict(greedy=temperature == 0.0, top_k=top_k, use_top_p=top_p < 1.0)
    temp, nucleus = np.float32(max(temperature, 1e-6)), np.float32(top_p)
    eos = np.int32(-1 if eos_id is None else eos_id)
    state = _first_program(logits, np.uint32(seed), temp, nucleus, eos, cache, **sampling)
    first, done = jax.device_get((state.token, state.done))
    yield first[:, None].astype(np.int32), state
    emitted = 1
    while emitted < max_new_tokens and not done.all():
        steps = min(block, max_new_tokens - emitted)
        state, out, ran = _block_program()(params, state, np.int32(steps), temp, nucleus, eos, cfg=cfg,
                                           block=block, **sampling)
        out, ran, done = jax.device_get((out, ran, state.done))
        yield out[:, :int(ran)], state
        emitted += int(ran)
