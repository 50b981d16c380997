"""Text in, text out: `Sampler` (prompts -> completions) and `Chat` (a conversation over one cache).

The text level sits above the engine (`generate`, `prefill`, `extend`, `decode_blocks`) and computes
nothing those functions cannot: it tokenizes (through the tokenizer's chat template where it applies),
right-pads a ragged batch (the engine pads its width to a bucket, so nearby prompt lengths share one
compiled program, and `max_new_tokens` changes nothing compiled within its bucket), calls the engine,
decodes the tokens and reports what compression did.

Results. `generate` returns a `Completion` per prompt: a `str` (so `sampler.generate("x")` prints,
compares and concatenates as the text) carrying `.tokens` (the new token ids, EOS included) and `.stats`
(a `Stats`: prompt tokens, kept slots per layer, cache bytes held vs the full cache's, as
`snapkv-generate` reports). With `stream=True` it returns a `Stream`, an iterator of text pieces whose
`.result` holds the same Completions once it is exhausted.

State. `return_state=True` also returns a `State`: the cache holding every token so far but each row's
last emitted one (`State.token`, fed first on continuing), each row's conversation as messages, and
the rows' positions. `generate(text, last_state=state)` appends the next turn through `extend` and
continues from there; `Chat` is that loop with a history.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from snapkv_jax import cache as kv
from snapkv_jax import compression
from snapkv_jax.config import ModelConfig
from snapkv_jax.decode_blocks import stream_generate
from snapkv_jax.generate import _check_chunk, _is_int, check_flag, check_generation
from snapkv_jax.generate import generate as generate_tokens
from snapkv_jax.sampling import Greedy, Strategy, check_strategy

__all__ = ["Chat", "Completion", "Sampler", "State", "Stats", "Stream"]

_TEMPLATES = ("auto", False)
_MARKER = "\x00ANSWER\x00"  # stands for an answer's content when rendering the template around it
# transformers' `clean_up_tokenization` deletes a space before ".", "?", "!", ",", "' ", "n't", "'m", "'s",
# "'ve" or "'re": once 3 characters follow a space without that happening, it stays
_CLEANED = 3


# --- results -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stats:
    """What one row's generation held, as `snapkv-generate` reports it. Bytes count K and V over all
    layers; `kv_bytes_full` is what an uncompressed cache of the same tokens holds (context + new)."""

    mode: str                    # "full cache" or the method's description
    prompt_tokens: int           # tokens this call added: the prompt, or a continuation's segment
                                 # (the last answer's final token, then the new turn's tokens)
    context_tokens: int          # positions before the answer: earlier turns + this prompt
    new_tokens: int              # tokens generated, EOS included
    kept_slots: tuple[int, ...]  # per layer: slots holding context positions (widest KV head)
    kv_bytes_held: int           # the row's live context slots + its new tokens
    kv_bytes_full: int           # (context_tokens + new_tokens) slots in every layer
    kv_bytes_allocated: int      # the row's share of the cache arrays (empty slots included)

    def report(self) -> str:
        """The lines `snapkv-generate` prints on stderr about the cache."""
        kept = self.kept_slots
        kept_text = (f"{kept[0]} in each of {len(kept)} layers" if len(set(kept)) == 1 else
                     ", ".join(map(str, kept)))
        full, held = self.kv_bytes_full, self.kv_bytes_held
        return "\n".join([
            f"mode: {self.mode}",
            f"prompt tokens: {self.prompt_tokens}" + (
                f" ({self.context_tokens} in the context)" if self.context_tokens != self.prompt_tokens else ""),
            f"kept prompt slots per layer: {kept_text}",
            f"KV-cache bytes: full {full / 2**20:.2f} MiB, this cache holds {held / 2**20:.2f} MiB "
            f"({full / held:.2f}x smaller) in {self.kv_bytes_allocated / 2**20:.2f} MiB allocated",
            f"new tokens: {self.new_tokens}",
        ])


class Completion(str):
    """A generated text (a `str`), with `.tokens` (the new token ids, EOS included) and `.stats`."""

    tokens: tuple[int, ...]
    stats: Stats

    def __new__(cls, text: str, tokens: Sequence[int], stats: Stats):
        self = super().__new__(cls, text)
        self.tokens, self.stats = tuple(tokens), stats
        return self


@dataclasses.dataclass(frozen=True, eq=False)
class State:
    """A batch's conversation so far, to continue with `Sampler.generate(..., last_state=state)`.

    `cache` holds every token of every row but its last emitted one, `token [B]`, which the next turn
    feeds first; `positions [B]` counts the tokens so far (the cache's `next_pos` + 1); `messages[b]` is
    row b's conversation as `{"role", "content"}` dicts when the chat template applies, else None.
    """

    cache: kv.KVCache
    token: np.ndarray                              # [B] int32
    positions: np.ndarray                          # [B] int32
    messages: tuple[tuple[dict, ...] | None, ...]  # per row, up to the last prompt (its answer excluded)
    answers: tuple[tuple[int, ...], ...]           # per row, the last answer's tokens, `token` last


def _check_state(state: State) -> None:
    """Raises ValueError unless a State's parts agree: a KVCache, and `token`, `positions`, `messages`
    and `answers` one per row of it (a State assembled by hand would otherwise fail in indexing)."""
    if not isinstance(state.cache, kv.KVCache):
        raise ValueError(f"last_state.cache must be a snapkv_jax.KVCache, got {type(state.cache).__name__}")
    rows = state.cache.batch
    rows_of = lambda x: (len(x),) if isinstance(x, (tuple, list)) else np.shape(x)
    sizes = dict(token=np.shape(state.token), positions=np.shape(state.positions),
                 messages=rows_of(state.messages), answers=rows_of(state.answers))
    for name, shape in sizes.items():
        if shape != (rows,):
            raise ValueError(f"last_state.{name} must hold one entry per row of its cache ({rows}), got shape "
                             f"{shape}")


# --- tokenization --------------------------------------------------------------------------------

def _is_messages(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def _check_messages(messages, where: str) -> tuple[dict, ...]:
    for i, m in enumerate(messages):
        if not {"role", "content"} <= set(m) or not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise ValueError(f"{where} message {i} must be a dict with 'role' and 'content' strings, got {m!r}")
    return tuple(dict(m) for m in messages)


class _Detokenizer:
    """One row's incremental decoding: `push(ids)` returns the text the new ids complete, holding back a
    trailing U+FFFD (a multi-byte character whose remaining bytes are in tokens not seen yet) and, for a
    tokenizer that cleans up spaces (`clean_up_tokenization_spaces`), a last space followed by fewer than
    `_CLEANED` characters: a later token can still delete it ("a ." -> "a.", "a ' b" -> "a'b", "a n't" ->
    "an't"). Invariant: each piece extends the text returned so far, so the pieces and `flush()` add up
    to the decoded text of all the ids (once a returned piece was rewritten, nothing more would come)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""
        self.cleans_spaces = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))

    def _piece(self, text: str) -> str:
        if not text.startswith(self.text):  # a decoder that rewrote earlier text: wait for the end
            return ""
        piece, self.text = text[len(self.text):], text
        return piece

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd")
        space = text.rfind(" ")
        if self.cleans_spaces and space >= 0 and len(text) - space - 1 < _CLEANED:
            text = text[:space]
        return self._piece(text)

    def flush(self) -> str:
        return self._piece(self.tokenizer.decode(self.ids, skip_special_tokens=True))


# --- the sampler ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """Prompts in, text out, on `params`/`cfg` with `tokenizer` (a Hugging Face tokenizer).

    `compress`: the compression method of every prompt's prefill (None: the full cache).
    `chat_template`: "auto" wraps a plain string in the tokenizer's chat template as a user turn when the
    tokenizer has one (an instruct model), False sends it as it is; a list of `{"role", "content"}`
    messages is always templated. `eos_id`: where a row stops (default: the tokenizer's EOS, else the
    config's). `chunk`: the prefill's tokens per chunk (see `prefill`). `stream_block`: decode steps per
    jitted block when streaming.
    """

    params: Any = dataclasses.field(repr=False)      # a notebook echoing the sampler prints no weights
    cfg: ModelConfig
    tokenizer: Any = dataclasses.field(repr=False)
    compress: compression.Method | None = dataclasses.field(default=None, kw_only=True)
    chat_template: str | bool = dataclasses.field(default="auto", kw_only=True)
    eos_id: int | None = dataclasses.field(default=None, kw_only=True)
    chunk: int | str | None = dataclasses.field(default="auto", kw_only=True)
    stream_block: int = dataclasses.field(default=8, kw_only=True)

    def __post_init__(self):
        if not isinstance(self.cfg, ModelConfig):
            raise ValueError(f"cfg must be a snapkv_jax.ModelConfig (sk.load returns one), got "
                             f"{type(self.cfg).__name__}")
        if not callable(self.tokenizer) or not hasattr(self.tokenizer, "decode"):
            raise ValueError(f"tokenizer must be a Hugging Face tokenizer (callable, with decode; sk.load returns "
                             f"one), got {type(self.tokenizer).__name__}")
        compression.check_method(self.compress, self.cfg.num_layers)
        _check_chunk(self.chunk)
        if self.chat_template not in _TEMPLATES or self.chat_template is True:
            raise ValueError(f"chat_template must be 'auto' or False, got {self.chat_template!r}")
        if not _is_int(self.stream_block) or self.stream_block < 1:
            raise ValueError(f"stream_block must be a positive integer, got {self.stream_block!r}")
        object.__setattr__(self, "stream_block", int(self.stream_block))
        if self.eos_id is None:
            tok_eos = getattr(self.tokenizer, "eos_token_id", None)
            object.__setattr__(self, "eos_id", self.cfg.eos_token_id if tok_eos is None else int(tok_eos))
        if self.eos_id is not None and (not _is_int(self.eos_id) or not 0 <= self.eos_id < self.cfg.vocab_size):
            raise ValueError(f"eos_id={self.eos_id!r} must be a token id in [0, {self.cfg.vocab_size})")
        if self.eos_id is not None:
            object.__setattr__(self, "eos_id", int(self.eos_id))

    @property
    def has_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def mode(self) -> str:
        return "full cache" if self.compress is None else self.compress.describe()

    # - encoding -

    def _render(self, messages, *, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def _ids(self, text: str, *, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def encode(self, prompt) -> tuple[list[int], tuple[dict, ...] | None]:
        """(token ids, messages or None) of one prompt: a string or a list of messages. Raises
        ValueError for a prompt of another type, messages without a chat template, or no tokens."""
        if _is_messages(prompt):
            messages = _check_messages(prompt, "prompt")
            if not self.has_template:
                raise ValueError("messages need a chat template, and this tokenizer has none; pass a string")
        elif isinstance(prompt, str):
            templated = self.chat_template == "auto" and self.has_template
            messages = ({"role": "user", "content": prompt},) if templated else None
        else:
            raise ValueError(f"a prompt must be a string or a list of {{'role', 'content'}} messages, got "
                             f"{type(prompt).__name__}")
        if messages is None:
            ids = self._ids(prompt, special=True)
        else:  # the rendered text's ids: the same split as the segments of later turns
            ids = self._ids(self._render(messages, add_generation_prompt=True), special=False)
        if not ids:
            raise ValueError(f"empty prompt: {prompt!r} encodes to no tokens")
        return ids, messages

    def _turn_ids(self, state: State, row: int, answer: Sequence[int], text) -> tuple[list[int], tuple | None]:
        """The ids that follow row `row`'s last `answer` (already in the cache but its last token,
        `State.token`) up to the new turn's generation prompt, and the row's messages with the turn.

        The template is rendered with a marker for the answer's content; what follows the marker is the
        segment (the end-of-turn marker, the new turn, the generation prompt), so the sampled answer is
        never re-tokenized. An end-of-turn the answer already emitted (its EOS) is not repeated."""
        history = state.messages[row]
        if history is None:
            if not isinstance(text, str):
                raise ValueError("this conversation has no chat template; continue it with a string")
            return self._ids(text, special=False), None
        if _is_messages(text):
            new = _check_messages(text, "turn")
        elif isinstance(text, str):
            new = ({"role": "user", "content": text},)
        else:
            raise ValueError(f"a turn must be a string or a list of messages, got {type(text).__name__}")
        framed = self._render(history + ({"role": "assistant", "content": _MARKER},) + new, add_generation_prompt=True)
        if framed.count(_MARKER) != 1:
            raise ValueError("the tokenizer's chat template does not place an assistant message exactly once")
        ids = self._ids(framed.split(_MARKER)[1], special=False)
        if answer and answer[-1] == self.eos_id and ids[:1] == [self.eos_id]:
            ids = ids[1:]
        answer_text = self.tokenizer.decode(list(answer), skip_special_tokens=True)
        return ids, history + ({"role": "assistant", "content": answer_text},) + new

    # - generation -

    def _batch(self, prompts) -> tuple[bool, list]:
        if isinstance(prompts, str) or _is_messages(prompts):
            return True, [prompts]
        if isinstance(prompts, (list, tuple)) and prompts:
            return False, list(prompts)
        raise ValueError(f"prompts must be a string, a list of messages or a non-empty list of those, got "
                         f"{prompts!r}")

    def generate(self, prompts, *, max_new_tokens: int = 64, sampling: Strategy = Greedy(), seed: int = 0,
                 return_state: bool = False, last_state: State | None = None, recompress_at: int | None = None,
                 stream: bool = False):
        """Completions of `prompts`: a string or a list of messages (-> one `Completion`), or a list of
        those (a ragged batch -> a list of Completions, in order).

        `sampling`: a strategy (`Greedy()`, `Temperature(t)`, `TopK(k, t)`, `TopP(p, t)`); the same `seed`
        gives the same text for the same prompts (a sampled row also depends on its batch-mates: one key
        per step draws every row's token). `stream=True` returns a `Stream` of text pieces instead (the same text; its
        `.result`, and `.state` with `return_state`, fill in once it is exhausted).
        `return_state=True` returns `(result, state)`; `last_state=state` continues that state's rows
        with one new turn per row (through `extend`), `recompress_at=N` then re-compresses a row's live
        cache with the sampler's method when the turn would take it past N slots.

        Raises ValueError, before anything is compiled, for a bad prompt, strategy or generation
        argument (those `generate` refuses).
        """
        check_flag(return_state, "return_state")
        check_flag(stream, "stream")
        single, items = self._batch(prompts)
        kwargs = self._generation_kwargs(max_new_tokens, sampling, seed)
        if last_state is not None:
            return self._continue(items, single, last_state, kwargs, return_state, recompress_at, stream)
        if recompress_at is not None:
            raise ValueError("recompress_at applies to a continuation; pass last_state= too")
        encoded = [self.encode(p) for p in items]
        tokens, lengths = _right_pad([e[0] for e in encoded])                    # [B, T], [B]
        finish = _Finisher(self, single, return_state, [e[1] for e in encoded], lengths, lengths)
        kwargs.update(compress=self.compress, chunk=self.chunk)
        return self._run(tokens, lengths, finish, single, stream, kwargs)

    def _run(self, tokens, lengths, finish, single: bool, stream: bool, kwargs):
        """The token-level run of one call: a Stream over decoded blocks, or the finished Completions."""
        if stream:
            blocks = stream_generate(self.params, self.cfg, tokens, lengths, block=self.stream_block, **kwargs)
            return Stream(self.tokenizer, blocks, finish, single)
        out = generate_tokens(self.params, self.cfg, tokens, lengths, **kwargs)
        new, n = jax.device_get((out.tokens, out.lengths))                      # [B, N], [B]
        return finish(new, n, out.cache)

    def _continue(self, items, single, state: State, kwargs, return_state, recompress_at, stream):
        """One more turn per row of `state`: the segment (the row's pending token, then the new turn's
        ids) goes through `generate(..., cache=)` (its `extend` re-compresses when a row would pass
        `recompress_at`), or its streamed twin."""
        if not isinstance(state, State):
            raise ValueError(f"last_state must be a State from generate(..., return_state=True), got {state!r}")
        _check_state(state)
        if len(items) != state.cache.batch:
            raise ValueError(f"last_state holds {state.cache.batch} rows; got {len(items)} prompts")
        turns = [self._turn_ids(state, b, state.answers[b], text) for b, text in enumerate(items)]
        segments = [[int(state.token[b])] + ids for b, (ids, _) in enumerate(turns)]
        tokens, lengths = _right_pad(segments)                                   # [B, T], [B]
        kwargs.update(cache=state.cache, chunk=self.chunk,
                      compress=self._recompress(state, lengths, kwargs["max_new_tokens"], recompress_at))
        finish = _Finisher(self, single, return_state, [m for _, m in turns], lengths,
                           state.positions - 1 + lengths)
        return self._run(tokens, lengths, finish, single, stream, kwargs)

    def _generation_kwargs(self, max_new_tokens, sampling, seed) -> dict:
        """`generate`'s keywords for a call, checked (the prompt's length aside, which `generate` checks)
        before any arithmetic on them."""
        kwargs = dict(max_new_tokens=max_new_tokens, eos_id=self.eos_id, seed=seed,
                      **check_strategy(sampling).as_kwargs())
        check_generation(self.cfg, None, **kwargs)
        return kwargs

    def _check_recompress_at(self, recompress_at, max_new_tokens: int) -> None:
        """Raises ValueError unless `recompress_at` can bound the live cache of a turn of `max_new_tokens`
        (a positive integer): the sampler has a method, and N is at least its slots plus the answer."""
        _check_recompresses(self.compress)
        widest = self.compress.max_slots(self.cfg.num_layers)
        if not _is_int(recompress_at) or recompress_at < widest + max_new_tokens - 1:
            raise ValueError(f"recompress_at={recompress_at!r} must be an integer >= the method's {widest} "
                             f"slots + max_new_tokens - 1 = {widest + max_new_tokens - 1}")

    def _recompress(self, state: State, lengths, max_new_tokens, recompress_at):
        """The method `extend` re-compresses with: the sampler's, when a row's live slots plus this
        turn's segment and answer would pass `recompress_at`; else None. Raises ValueError when the
        bound cannot hold (no method, or N below the method's slots plus the answer)."""
        if recompress_at is None:
            return None
        self._check_recompress_at(recompress_at, max_new_tokens)
        live = np.asarray(jax.device_get(kv.valid_slots(state.cache))).max(axis=(0, 2))   # [B]
        return self.compress if (live + lengths + max_new_tokens - 1 > recompress_at).any() else None


def _check_recompresses(method) -> None:
    """Raises ValueError unless `method` can re-compress a live cache, as `recompress_at` needs: there is
    one, and it re-selects over live slots."""
    if method is None:
        raise ValueError("recompress_at needs a compression method: build the Sampler with compress=")
    check_reselects_live(type(method), "recompress_at", type(method).__name__)


def check_reselects_live(method_class, option: str, shown: str) -> None:
    """Raises ValueError naming `option` (the argument or flag that asks to re-compress a conversation)
    unless `method_class` re-selects over live slots (KVzip does not: its scores need a reconstruction
    pass); `shown`: the method as the caller's user spells it."""
    if not method_class.reselects_live:
        raise ValueError(f"{option} needs a method that can re-compress a live cache; {shown} cannot "
                         f"(its scores need a reconstruction pass over the context)")


def _right_pad(ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(i) for i in ids], np.int32)                          # [B]
    tokens = np.zeros((len(ids), int(lengths.max())), np.int32)                  # [B, T]
    for row, i in enumerate(ids):
        tokens[row, :len(i)] = i
    return tokens, lengths


@dataclasses.dataclass
class _Finisher:
    """Turns one batch's emitted tokens and final cache into Completions (and a State)."""

    sampler: Sampler
    single: bool
    return_state: bool
    messages: list
    prompt_tokens: np.ndarray    # [B] tokens each row added in this call
    context: np.ndarray          # [B] positions before the answer

    def __call__(self, new: np.ndarray, n: np.ndarray, cache: kv.KVCache):
        s = self.sampler
        answers = [new[b, :n[b]].tolist() for b in range(len(n))]
        stats = _stats(s, cache, self.prompt_tokens, self.context, n)
        done = [Completion(s.tokenizer.decode(a, skip_special_tokens=True), a, st) for a, st in zip(answers, stats)]
        result = done[0] if self.single else done
        if not self.return_state:
            return result
        positions = self.context + n                                             # [B] tokens so far
        state = State(cache=cache, token=np.array([a[-1] for a in answers], np.int32),
                      positions=positions.astype(np.int32), messages=tuple(self.messages),
                      answers=tuple(tuple(a) for a in answers))
        return result, state


def _stats(s: Sampler, cache: kv.KVCache, prompt_tokens, context, n) -> list[Stats]:
    """Per-row Stats from the final cache `pos` (host copies; a few KB per layer)."""
    pos = [np.asarray(p) for p in jax.device_get(cache.pos)]                    # L x [B, K, S]
    item = np.dtype(cache.k[0].dtype).itemsize
    per_head_slot = 2 * s.cfg.head_dim * item                                   # K and V of one head
    per_slot = per_head_slot * s.cfg.num_kv_heads * s.cfg.num_layers            # every head and layer
    allocated = kv.allocated_bytes(cache) // cache.batch
    out = []
    for b in range(cache.batch):
        ctx = int(context[b])
        held = [(p[b] >= 0) & (p[b] < ctx) for p in pos]                         # L x [K, S]
        out.append(Stats(
            mode=s.mode, prompt_tokens=int(prompt_tokens[b]), context_tokens=ctx, new_tokens=int(n[b]),
            kept_slots=tuple(int(h.sum(-1).max()) for h in held),
            kv_bytes_held=sum(int(h.sum()) for h in held) * per_head_slot + per_slot * int(n[b]),
            kv_bytes_full=per_slot * (ctx + int(n[b])), kv_bytes_allocated=allocated))
    return out


class Stream:
    """Text pieces as decoding proceeds: iterating yields a `str` per block for one prompt, a list of
    `str` (one per row, "" when a row had nothing new) for a batch. Pieces never split a multi-byte
    character; their concatenation is the non-streamed text for the same seed. Once exhausted,
    `result` holds the Completion(s) and `state` the State (with `return_state=True`). An iteration that
    raises (an error, or Ctrl-C in a notebook), or `close()` after a `break` out of its loop, ends the
    stream without a result: `failed` is then True."""

    def __init__(self, tokenizer, blocks, finish: _Finisher, single: bool, on_done=None):
        self._pieces = self._run(tokenizer, blocks, finish)
        self._single = single
        self._on_done = on_done
        self.result = None
        self.state = None
        self.failed = False

    @property
    def done(self) -> bool:
        return self.result is not None

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        try:
            pieces = next(self._pieces)
        except StopIteration:
            raise
        except BaseException:  # the generator is closed now: it can never finish
            self.failed = True
            raise
        return pieces[0] if self._single else pieces

    def close(self) -> None:
        """Abandons an unfinished stream (say after a `break` out of its loop): it yields nothing more and
        gets no result, and the Chat it came from drops its turn. A no-op once it is exhausted."""
        if not self.done:
            self._pieces.close()
            self.failed = True

    def _run(self, tokenizer, blocks, finish: _Finisher):
        rows: list[_Detokenizer] | None = None
        parts, state = [], None
        for new, state in blocks:                                                # new [B, n]
            if rows is None:
                rows = [_Detokenizer(tokenizer) for _ in range(new.shape[0])]
            parts.append(new)
            n = np.asarray(jax.device_get(state.lengths))                        # [B]
            emitted = np.concatenate(parts, axis=1)
            pieces = [r.push(emitted[b, len(r.ids):n[b]]) for b, r in enumerate(rows)]
            if any(pieces):
                yield pieces
        tail = [r.flush() for r in rows]
        if any(tail):
            yield tail
        n = np.asarray(jax.device_get(state.lengths))
        out = finish(np.concatenate(parts, axis=1), n, state.cache)
        self.result, self.state = out if finish.return_state else (out, None)
        if self._on_done is not None:
            self._on_done(self.result, self.state)


# --- the chat ------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Chat:
    """A conversation with `sampler`'s model over one cache: each `send` appends the user's turn and the
    model's answer to it (`Sampler.generate(..., last_state=)`, through `extend`), so earlier turns are
    never prefilled again. The first turn's prompt is compressed by the sampler's method as any prompt.

    `recompress_at=N` bounds the live cache: when a turn would take it past N slots, `extend`
    re-compresses it with the sampler's method (its window: the turn's last tokens), so a long
    conversation holds at most N slots per (layer, KV head); N must leave the method's slots room for an
    answer, and the method must re-select over live slots (KVzip cannot: refused here). `history` lists
    the turns as `{"role", "content"}` dicts; `cache` is the live KVCache (None before the first turn);
    `reset()` forgets both (a stream still open then no longer feeds this chat).

    Invariant: history and cache change only when an answer is complete (`send` returned it, or its
    `Stream` was exhausted); a `send` that raises, or a stream that failed (`Stream.failed`: Ctrl-C, an
    error, or `close()`), leaves the chat at its last complete turn.
    """

    sampler: Sampler
    recompress_at: int | None = dataclasses.field(default=None, kw_only=True)
    _state: State | None = dataclasses.field(default=None, init=False, repr=False)
    _history: list = dataclasses.field(default_factory=list, init=False, repr=False)
    _open: Stream | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.sampler, Sampler):
            raise ValueError(f"Chat needs a snapkv_jax.Sampler, got {type(self.sampler).__name__}")
        n = self.recompress_at
        if n is not None:
            if not _is_int(n) or n < 1:
                raise ValueError(f"recompress_at must be a positive integer or None, got {n!r}")
            self.recompress_at = int(n)
            _check_recompresses(self.sampler.compress)

    def _check_closed(self):
        if self._open is not None and self._open.failed:  # its answer can never come: the turn is dropped
            self._open = None
        if self._open is not None and not self._open.done:
            raise ValueError("the last streamed answer is not finished: iterate its Stream to the end, or "
                             "chat.pending.close() to drop that turn")

    @property
    def pending(self) -> Stream | None:
        """The streamed answer not yet taken in (None when there is none): `chat.pending.close()` drops its
        turn, for instance after a `break` out of the stream's loop left no name for it."""
        return None if self._open is None or self._open.done or self._open.failed else self._open

    @property
    def history(self) -> list[dict]:
        self._check_closed()
        return [dict(m) for m in self._history]

    @property
    def cache(self) -> kv.KVCache | None:
        self._check_closed()
        return None if self._state is None else self._state.cache

    def reset(self) -> None:
        if self._open is not None:  # finished later, it would bring back the conversation forgotten here
            self._open._on_done = None
        self._state, self._history, self._open = None, [], None

    def send(self, text: str, *, max_new_tokens: int = 64, sampling: Strategy = Greedy(), seed: int = 0,
             stream: bool = False):
        """The model's answer to `text` (a `Completion`), or a `Stream` of it with `stream=True` (the
        chat takes the answer in when the stream is exhausted). Raises ValueError for an empty or
        non-string `text`, a bad generation argument, a `recompress_at` this turn would pass (also on the
        first turn, which prefill compresses to the method's slots), or while a streamed answer is
        unfinished."""
        self._check_closed()
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a chat turn must be a non-empty string, got {text!r}")
        kwargs = dict(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, return_state=True, stream=stream)
        if self._state is not None:
            kwargs.update(last_state=self._state, recompress_at=self.recompress_at)
        elif self.recompress_at is not None:  # prefill compresses turn 1 to the method's slots: is that enough?
            self.sampler._generation_kwargs(max_new_tokens, sampling, seed)
            self.sampler._check_recompress_at(self.recompress_at, max_new_tokens)

        def take(answer: Completion, state: State):
            self._state = state
            self._history += [{"role": "user", "content": text}, {"role": "assistant", "content": str(answer)}]

        out = self.sampler.generate(text, **kwargs)
        if stream:
            out._on_done, self._open = take, out
            return out
        take(*out)
        return out[0]
