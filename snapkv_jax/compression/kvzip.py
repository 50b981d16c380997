"""KVzip (Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv
2505.23416): a context's KV pair matters as much as the model needs it to reconstruct that context. After
the context is prefilled, a reconstruction prompt (a fixed instruction, then the context's own tokens
again, teacher-forced) runs through the model against the context's cache; each context key is scored by
the largest attention any reconstruction query gives it, and the lowest-scored pairs are evicted. No
question is needed, so one compressed cache serves any later question (the paper's section 3).

Run layer-major here (layer_prefill.py with reconstruction.py): at layer l the context's K/V are complete;
the reconstruction's hidden states pass through layer l, attending to that layer's whole context K/V
(padding masked) and causally to themselves; layer l is scored and compressed and the reconstruction's
hidden states go on to layer l+1. So only one layer's full K/V is ever alive, unlike kvpress's
`KVzipPress`, which holds every layer's full cache while it scores.

The reconstruction, as in the paper's chunked scoring for long contexts and its reference code: the context
positions 0 .. L-1 are cut into chunks of `chunk` positions (chunk i: positions i*chunk ..), and chunk i
is reconstructed on its own, after the context, as

    chunk 0:  repeat + suffix + context[0 : chunk]
    chunk i:  resume + context[i*chunk - overlap : i*chunk] + suffix + context[i*chunk : (i+1)*chunk]

at RoPE positions L, L+1, ... (each chunk's reconstruction is discarded before the next, so all start at
L; each is padded to R tokens, padding after its real tokens and never a scoring query). `repeat` / `resume` are the token ids of the paper's instructions REPEAT_TEXT / RESUME_TEXT (the
latter quotes the previous chunk's last `overlap` = 8 tokens), `suffix` the chat template's assistant
header (kvpress uses "\\n" without a template); `KVzip.from_tokenizer` builds all three.

Score (`chunk_scores`; per layer, row b, KV head k, for context position j of chunk i):

    score[j] = max over the G query heads h of KV head k and every real query t of chunk i's
               reconstruction of  softmax_t(q_t . [k_sinks, k_chunk_i, k_reconstruction<=t] / sqrt(D))[j]

so a key is scored by its own chunk's reconstruction only, and the softmax is taken over the first
`sinks` keys (chunks i > 0), chunk i's own context keys and the reconstruction's own causal keys, as the
reference implementations compute it (snu-mllab/KVzip's
`attention/score.py` and kvpress's `KVzipPress.score_kvzip`): linear in L, not quadratic, because a
chunk's reconstruction attends almost only to its own chunk. (The reconstruction's hidden states, by
contrast, come from attention over the whole context.) Softmax in float32; no pooling; the sliding window
of a Mistral model bounds the reconstruction's attention but not the score, as for SnapKV's scores.
`normalize=True` is KVzip+ (Jegou & Jeblick, "KVzap", arXiv 2601.07891, as kvpress's
`kvzip_plus_normalization` computes it): each probability is divided by the norm of the attention input
of the query's token (after the layer's RMSNorm) and multiplied by ||W_O^h v_j||, the norm of what key j's
value adds to the residual stream through query head h's slice of the output projection.

Selection: rows with L <= capacity are untouched. Longer rows always keep positions 0 .. sinks-1
(attention sinks, Xiao et al., arXiv 2309.17453, kept as kvpress's `n_sink`) in every layer and head, and
  * `budget="layer"` (a uniform budget): per (layer, KV head) the capacity - sinks best-scored other
    positions; `capacity` slots, ascending. Not kvpress's `layerwise=True`, which shares each layer's
    K * capacity pairs among its KV heads (one top-k over the layer's heads and positions); that rule
    has no setting here.
  * `budget="global"` (the paper's default, kvpress's `layerwise=False`): per row, the L * K * capacity
    best-scored (layer, KV head, position) triples over all layers and heads (sinks counted), so layers
    and heads whose reconstruction needs more keep more. A layer-major prefill must cut layer l's K/V
    before later layers are scored, so each layer first keeps its `max_per_head` (default 2 * capacity)
    best candidates per KV head, with their scores (`[L, B, K, max_per_head]` float32, not the
    `[L, B, K, T]` of all scores, nor any layer's full K/V); after the last layer one joint top-k over the
    candidates leaves the winners (`global_select`). The result is the exact global top-k under a cap of
    `max_per_head` slots per (layer, KV head): equal to the uncapped one unless some layer-head would take
    more. The price: during prefill every layer holds `max_per_head` slots, and the cache keeps that
    width (kept positions first, then holes), holding L * K * capacity positions per row. kvpress caps
    no layer-head: `max_per_head=T` (the prompt width) gives its kept sets exactly
    (experiments/kvpress_parity.py).

Cost: the reconstruction is a second prefill of L + chunks x (instruction) tokens whose attention reads
the whole context (about twice the causal prefill's attention FLOPs), plus the scores' `[R, chunk + R]`
softmax per chunk; memory: the reconstruction's hidden states `[B, chunks, R, Dm]` besides the prompt's,
and one reconstruction chunk's activations (`reconstruction_bytes`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from snapkv_jax.compression.base import (LayerInputs, Method, ascending, check_choice, check_int, keep_all,
                                         untouched_below)

BUDGETS = ("layer", "global")
REPEAT_TEXT = "\n\nRepeat the previous context exactly."
RESUME_TEXT = "\n\nRepeat the part of the previous context exactly, starting with"
# The scores' float32 probabilities of one query block stay under this many bytes.
SCORE_BLOCK_BYTES = 1 << 28
_SINK = float(jnp.finfo(jnp.float32).max)  # a sink's rank: above any score, and finite for top_k


def _token_ids(value, name: str) -> tuple[int, ...]:
    if value is None:
        raise ValueError(f"KVzip needs the token ids of its reconstruction prompt ({name}=...); build the "
                         f"method with sk.KVzip.from_tokenizer(tokenizer, capacity=...)")
    try:
        ids = tuple(value)
    except TypeError:  # a bare id, say
        raise ValueError(f"KVzip {name} must be a sequence of token ids, got {value!r}") from None
    for t in ids:
        if not isinstance(t, numbers.Integral) or isinstance(t, bool) or t < 0:
            raise ValueError(f"KVzip {name} must be non-negative token ids, got {t!r}")
    return tuple(int(t) for t in ids)


@dataclasses.dataclass(frozen=True)
class KVzip(Method):
    """`capacity` slots per (layer, row, KV head): `sinks` first positions and the best-reconstructing
    others. `repeat`, `resume`, `suffix`: token ids of the reconstruction prompt (see the module
    docstring; `from_tokenizer` makes them); `budget`, `max_per_head`: as there. Invariants: capacity > sinks;
    chunk >= max(sinks, overlap); capacity <= max_per_head (global budget only)."""

    name: ClassVar[str] = "kvzip"
    # Scores come from a reconstruction pass that layer-major prefill runs (reconstruction.py).
    reconstructs: ClassVar[bool] = True
    reselects_live: ClassVar[bool] = False  # its scores need a reconstruction pass over the context

    capacity: int = 1024
    sinks: int = 4
    chunk: int = 2048
    normalize: bool = False
    repeat: tuple[int, ...] | None = None
    resume: tuple[int, ...] | None = None
    suffix: tuple[int, ...] = ()
    overlap: int = 8
    budget: str = "layer"
    max_per_head: int | None = None

    def __post_init__(self):
        for name, minimum in (("capacity", 1), ("sinks", 0), ("chunk", 1), ("overlap", 0)):
            object.__setattr__(self, name, check_int("KVzip", name, getattr(self, name), minimum))
        if self.capacity <= self.sinks:
            raise ValueError(f"KVzip capacity={self.capacity} must be greater than sinks={self.sinks}")
        if self.chunk < max(self.sinks, self.overlap):
            raise ValueError(f"KVzip chunk={self.chunk} must be at least sinks={self.sinks} and "
                             f"overlap={self.overlap}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"KVzip normalize must be True or False, got {self.normalize!r}")
        for name in ("repeat", "resume", "suffix"):
            object.__setattr__(self, name, _token_ids(getattr(self, name), name))
        check_choice("KVzip", "budget", self.budget, BUDGETS)
        if self.max_per_head is not None:
            if self.budget != "global":
                raise ValueError(f"KVzip max_per_head={self.max_per_head!r} applies to budget='global' only")
            cap = check_int("KVzip", "max_per_head", self.max_per_head, 1)
            if cap < self.capacity:
                raise ValueError(f"KVzip max_per_head={cap} is below capacity={self.capacity}")
            object.__setattr__(self, "max_per_head", cap)

    @property
    def cap(self) -> int:
        """Slots of each (layer, KV head): capacity, or with a global budget the per-head cap."""
        if self.budget == "layer":
            return self.capacity
        return 2 * self.capacity if self.max_per_head is None else self.max_per_head

    def slots(self, layer: int, num_layers: int) -> int:
        return self.cap

    @classmethod
    def from_tokenizer(cls, tokenizer, capacity: int = 1024, *, chat: bool = False, **knobs) -> "KVzip":
        """KVzip with the paper's instructions in `tokenizer`'s ids. `chat=True`: the prompts are chat
        turns, so the reconstruction follows the template's assistant header (split from a dummy turn,
        as kvpress does); otherwise a newline, kvpress's choice for models without a template."""
        def ids(text):
            return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

        suffix = "\n"
        if chat:
            marker = "\x00KVZIP\x00"
            framed = tokenizer.apply_chat_template([{"role": "user", "content": marker}],
                                                   add_generation_prompt=True, tokenize=False)
            if framed.count(marker) != 1:
                raise ValueError("the tokenizer's chat template does not place the user message exactly once")
            suffix = framed.split(marker)[1]
        return cls(capacity=capacity, repeat=ids(REPEAT_TEXT), resume=ids(RESUME_TEXT), suffix=ids(suffix),
                   **knobs)

    def check_tokens(self, vocab_size: int) -> None:
        for name in ("repeat", "resume", "suffix"):
            bad = [t for t in getattr(self, name) if t >= vocab_size]
            if bad:
                raise ValueError(f"KVzip {name} token id {bad[0]} is outside the vocabulary [0, {vocab_size})")

    def describe(self) -> str:
        budget = "layer" if self.budget == "layer" else f"global, max_per_head={self.cap}"
        return (f"kvzip(capacity={self.capacity}, sinks={self.sinks}, chunk={self.chunk}, "
                f"normalize={self.normalize}, budget={budget}, {len(self.repeat)}/{len(self.resume)}/"
                f"{len(self.suffix)} prompt tokens, overlap={self.overlap})")

    # --- the reconstruction's static layout --------------------------------------------------------
    def layout(self, width: int) -> tuple[int, int, int]:
        """(chunks N, chunk width cw, reconstruction length R) for prompts `width` tokens wide: every
        chunk's reconstruction is laid out as [its prompt, cw context tokens, padding] in R tokens, R a
        multiple of 16 (the lengths prefill's flash attention already runs at)."""
        n = -(-width // self.chunk)
        cw = min(self.chunk, width)
        later = len(self.resume) + self.overlap + len(self.suffix) if n > 1 else 0
        return n, cw, -(-(max(len(self.repeat) + len(self.suffix), later) + cw) // 16) * 16

    def positions(self, length: int) -> int:
        """The prompt's positions and its reconstruction's after them: the longest chunk's instructions and
        `min(chunk, length)` re-fed context tokens (padding aside)."""
        prompt = self.prompt_length(True) if length <= self.chunk else max(self.prompt_length(True),
                                                                            self.prompt_length(False))
        return length + prompt + min(self.chunk, length)

    def prompt_length(self, first: bool) -> int:
        return len(self.repeat) + len(self.suffix) if first else len(self.resume) + self.overlap + len(self.suffix)

    def reconstruction_bytes(self, cfg, batch: int, width: int, itemsize: int, flash: bool) -> int:
        """Peak bytes the reconstruction adds to a prefill: its hidden states, one chunk's activations,
        the scores' probabilities of one query block and, without flash attention, one chunk's logits
        against the whole context."""
        n, cw, r = self.layout(width)
        h, d = cfg.num_heads, cfg.head_dim
        hidden = batch * n * r * cfg.hidden_size * itemsize
        acts = batch * r * (4 * h * d + 3 * cfg.intermediate_size + 4 * cfg.hidden_size) * itemsize
        keys = cw + r + self.sinks
        block = min(r, max(1, SCORE_BLOCK_BYTES // max(1, batch * h * keys * 4)))
        scores = 3 * batch * h * block * keys * 4 + batch * cfg.num_kv_heads * n * cw * 4
        attention = 0 if flash else 3 * batch * h * r * (width + r) * 4
        return hidden + acts + scores + attention

    def select(self, inputs: LayerInputs, layer, num_layers: int, impl: str) -> jax.Array:
        """`[B, K, cap]`: the layer's kept positions, or with a global budget its candidates."""
        keys, lengths = inputs.keys, inputs.lengths
        kv_heads, t = keys.shape[1], keys.shape[2]
        if t <= self.capacity:
            return keep_all(lengths, kv_heads, self.cap)
        ranked = rank(inputs.query_scores, lengths, self.sinks)
        values, idx = lax.top_k(ranked, min(self.cap, t))
        kept = ascending(jnp.where(jnp.isfinite(values), idx.astype(jnp.int32), -1))
        if kept.shape[2] < self.cap:
            kept = jnp.pad(kept, ((0, 0), (0, 0), (0, self.cap - kept.shape[2])), constant_values=-1)
        return untouched_below(kept, lengths, self.capacity)


def rank(scores: jax.Array, lengths: jax.Array, sinks: int) -> jax.Array:
    """`[B, K, T]` scores -> what selection ranks: the sinks above everything, -inf at padding."""
    pos = jnp.arange(scores.shape[2])
    ranked = jnp.where(pos < sinks, _SINK, scores)
    return jnp.where(pos < lengths[:, None, None], ranked, -jnp.inf)


def kept_ranks(scores: jax.Array, kept: jax.Array, lengths: jax.Array, sinks: int) -> jax.Array:
    """`[B, K, W]` the rank (`rank`) of each kept position `kept [B, K, W]` (-inf at holes): a global
    budget's candidates, compared across layers by `global_select`."""
    values = jnp.take_along_axis(rank(scores, lengths, sinks), jnp.maximum(kept, 0), axis=2)
    return jnp.where(kept >= 0, values, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("capacity",))
def global_select(ks, vs, ps, ranks, *, capacity: int):
    """A global budget's last step: of the candidates of every layer (`ps[l] [B, K, S]`, whose first W
    slots are the prompt's, ranked by `ranks [L, B, K, W]`), each row keeps its L * K * capacity best;
    the others become holes. Each (layer, KV head) keeps its winners first, ascending, holes after (K/V
    permuted with them). Returns the new (ks, vs, ps) tuples."""
    n_layers, b, kv_heads, w = ranks.shape
    flat = ranks.transpose(1, 0, 2, 3).reshape(b, -1)                            # [B, L*K*W]
    values, top = lax.top_k(flat, min(n_layers * kv_heads * capacity, flat.shape[1]))
    won = jnp.zeros(flat.shape, bool).at[jnp.arange(b)[:, None], top].set(jnp.isfinite(values))
    won = won.reshape(b, n_layers, kv_heads, w).transpose(1, 0, 2, 3)            # [L, B, K, W]
    out_k, out_v, out_p = [], [], []
    for layer, (k, v, p) in enumerate(zip(ks, vs, ps)):
        prompt = jnp.where(won[layer], p[:, :, :w], -1)                          # [B, K, W]
        order = jnp.argsort(prompt < 0, axis=-1, stable=True)                    # winners first, in order
        out_p.append(jnp.concatenate([jnp.take_along_axis(prompt, order, axis=2), p[:, :, w:]], axis=2))
        out_k.append(jnp.concatenate([jnp.take_along_axis(k[:, :, :w], order[..., None], axis=2), k[:, :, w:]], 2))
        out_v.append(jnp.concatenate([jnp.take_along_axis(v[:, :, :w], order[..., None], axis=2), v[:, :, w:]], 2))
    return tuple(out_k), tuple(out_v), tuple(out_p)


def reconstruction_tokens(method: KVzip, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """`[B, N, R]` int32 token ids of every chunk's reconstruction (layout as in `KVzip.layout`; padding
    0) from right-padded `tokens [B, T]`."""
    b, t = tokens.shape
    n, cw, r = method.layout(t)
    starts = jnp.arange(n) * method.chunk                                        # [N]
    content = jnp.take(tokens, jnp.clip(starts[:, None] + jnp.arange(cw), 0, t - 1), axis=1)  # [B, N, cw]
    real = (starts[:, None] + jnp.arange(cw))[None] < lengths[:, None, None]
    content = jnp.where(real, content, 0)

    def const(ids, rows):
        return jnp.broadcast_to(jnp.asarray(ids, jnp.int32).reshape(1, 1, -1), (b, rows, len(ids)))

    def padded(parts, rows):
        row = jnp.concatenate(parts, axis=2)
        return jnp.pad(row, ((0, 0), (0, 0), (0, r - row.shape[2])))

    first = padded([const(method.repeat, 1), const(method.suffix, 1), content[:, :1]], 1)
    if n == 1:
        return first.astype(jnp.int32)
    tail = jnp.take(tokens, starts[1:, None] - method.overlap + jnp.arange(method.overlap), axis=1)  # [B, N-1, o]
    later = padded([const(method.resume, n - 1), tail, const(method.suffix, n - 1), content[:, 1:]], n - 1)
    return jnp.concatenate([first, later], axis=1).astype(jnp.int32)


def reconstruction_queries(method: KVzip, lengths: jax.Array, width: int) -> jax.Array:
    """`[B, N, R]` True at the real queries of each chunk's reconstruction: its prompt and its context
    tokens below the row's length, in chunks the row reaches (a chunk past L has no real query)."""
    n, cw, r = method.layout(width)
    starts = jnp.arange(n) * method.chunk                                        # [N]
    prompt = jnp.asarray([method.prompt_length(i == 0) for i in range(n)])       # [N]
    real_tokens = jnp.clip(lengths[:, None] - starts, 0, cw)                     # [B, N]
    limit = jnp.where(real_tokens > 0, prompt + real_tokens, 0)                  # [B, N]
    return jnp.arange(r)[None, None, :] < limit[:, :, None]


def chunk_scores(q: jax.Array, own_keys: jax.Array, chunk_keys: jax.Array, sink_keys: jax.Array | None,
                 chunk_real: jax.Array, query_real: jax.Array, query_weight: jax.Array | None = None,
                 key_weight: jax.Array | None = None) -> jax.Array:
    """`[B, K, cw]` float32 KVzip scores of one chunk's context keys from its reconstruction.

    q `[B, H, R, D]` the reconstruction's queries (after RoPE, unscaled); own_keys `[B, K, R, D]` its own
    keys (causal); chunk_keys `[B, K, cw, D]` the chunk's context keys, `chunk_real [B, cw]` True below the
    row's length; sink_keys `[B, K, s, D]` or None; query_real `[B, R]`. KVzip+: `query_weight [B, R]`
    (1 / ||attention input||) and `key_weight [B, H, cw]` (||W_O^h v_j||) scale the probabilities.
    Softmax over [sinks, chunk, own] in float32, one block of queries at a time (SCORE_BLOCK_BYTES).
    """
    b, h, r, d = q.shape
    group = h // own_keys.shape[1]
    parts = ([] if sink_keys is None else [sink_keys]) + [chunk_keys, own_keys]
    keys = jnp.repeat(jnp.concatenate(parts, axis=2).astype(q.dtype), group, axis=1)  # [B, H, s+cw+R, D]
    s, cw = 0 if sink_keys is None else sink_keys.shape[2], chunk_keys.shape[2]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
    block = r
    while block > 1 and b * h * block * keys.shape[2] * 4 > SCORE_BLOCK_BYTES:
        block = -(-block // 2)
    best = jnp.zeros((b, h, cw), jnp.float32)
    for first in range(0, r, block):
        rows = jnp.arange(first, min(first + block, r))                          # query indices
        logits = jnp.einsum("bhrd,bhkd->bhrk", q[:, :, first:first + block], keys, precision=precision,
                            preferred_element_type=jnp.float32) / math.sqrt(d)  # [B, H, q, s+cw+R]
        visible = jnp.concatenate([
            jnp.ones((b, 1, len(rows), s), bool),
            jnp.broadcast_to(chunk_real[:, None, None, :], (b, 1, len(rows), cw)),
            jnp.broadcast_to((jnp.arange(r)[None, :] <= rows[:, None])[None, None], (b, 1, len(rows), r)),
        ], axis=3)
        p = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)[..., s:s + cw]  # [B, H, q, cw]
        if query_weight is not None:
            p = p * query_weight[:, None, first:first + block, None]
        p = jnp.where(query_real[:, None, first:first + block, None], p, 0.0)
        best = jnp.maximum(best, jnp.max(p, axis=2))
    if key_weight is not None:
        best = best * key_weight
    return jnp.max(best.reshape(b, h // group, group, cw), axis=2)               # [B, K, cw]
