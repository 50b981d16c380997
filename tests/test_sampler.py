"""The text level: `sk.Sampler` equals the token-level engine it wraps, streams the same text, compiles
nothing new within a bucket, reports what compression did; the strategies refuse bad values; `sk.Chat`
continues one cache and stays within `recompress_at`.

A tiny random model with a word-level tokenizer (one token per word, so texts and tokens map 1:1),
given a small chat template for the templating tests.
"""

import dataclasses
import re

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import snapkv_jax as sk
from snapkv_jax import cache as kv
from snapkv_jax import decode_blocks, sampling
from snapkv_jax.sampler import _Detokenizer

from tests.compile_log import lowered

WORDS = ["[UNK]", "</s>", "user", "assistant", ":"] + [f"w{i}" for i in range(56)]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")
CFG = sk.ModelConfig.tiny(vocab_size=len(WORDS), eos_token_id=1)
SNAP = sk.SnapKV(window=4, capacity=16, kernel=3)


def _tokenizer(template: str | None):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    out.chat_template = template
    return out


PARAMS = sk.init_params(CFG, jax.random.key(0))
RAW = _tokenizer(None)
CHAT = _tokenizer(TEMPLATE)


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{(start + 7 * i) % 56}" for i in range(n))


PROMPTS = [words(30), words(9, 3), words(21, 5)]   # ragged: one width bucket (32)


def ids(text: str) -> list[int]:
    return RAW(text)["input_ids"]


def engine_tokens(prompts, compress=None, **kwargs) -> list[list[int]]:
    """The token-level reference: right-pad by hand, `sk.generate`, cut each row at its length."""
    rows = [ids(p) for p in prompts]
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for r, i in enumerate(rows):
        tokens[r, :len(i)] = i
    out = sk.generate(PARAMS, CFG, tokens, [len(i) for i in rows], compress=compress, eos_id=1, **kwargs)
    toks, n = jax.device_get((out.tokens, out.lengths))
    return [toks[r, :n[r]].tolist() for r in range(len(rows))]


STRATEGIES = [
    (sk.Greedy(), dict()),
    (sk.Temperature(1.3), dict(temperature=1.3)),
    (sk.TopK(5, temperature=0.8), dict(temperature=0.8, top_k=5)),
    (sk.TopK(5, temperature=0.8, top_p=0.6), dict(temperature=0.8, top_k=5, top_p=0.6)),
    (sk.TopP(0.7, temperature=1.1), dict(temperature=1.1, top_p=0.7)),
]


# --- strategies ----------------------------------------------------------------------------------

@pytest.mark.parametrize("build, message", [
    (lambda: sk.Temperature(0), "Temperature: temperature must be a finite number > 0, got 0"),
    (lambda: sk.Temperature(float("nan")), "temperature must be a finite number > 0, got nan"),
    (lambda: sk.Temperature("hot"), "got 'hot'"),
    (lambda: sk.TopK(0), "TopK: k must be an integer >= 1, got 0"),
    (lambda: sk.TopK(2.5), "TopK: k must be an integer >= 1, got 2.5"),
    (lambda: sk.TopK(4, temperature=-1.0), "TopK: temperature must be a finite number > 0, got -1.0"),
    (lambda: sk.TopK(4, top_p=0.0), "TopK: top_p must be a number in (0, 1], got 0.0"),
    (lambda: sk.TopP(0.0), "TopP: p must be a number in (0, 1], got 0.0"),
    (lambda: sk.TopP(1.5), "TopP: p must be a number in (0, 1], got 1.5"),
    (lambda: sk.TopP(0.9, temperature=float("inf")), "TopP: temperature must be a finite number > 0"),
])
def test_strategies_reject_bad_values_in_one_line(build, message):
    with pytest.raises(ValueError) as info:
        build()
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("strategy", [s for s, _ in STRATEGIES], ids=lambda s: type(s).__name__)
def test_a_strategy_and_generates_keywords_map_onto_each_other(strategy):
    assert sampling.from_kwargs(**strategy.as_kwargs()) == strategy


def test_top_k_and_top_p_together_are_a_top_k_strategy_with_a_nucleus():
    """generate (and snapkv-generate) take top_k with top_p; so does a strategy, so --chat, which goes
    through one, takes the flags the plain mode takes (it refused them)."""
    assert sampling.from_kwargs(temperature=1.0, top_k=5, top_p=0.9) == sk.TopK(5, 1.0, top_p=0.9)


@pytest.mark.parametrize("probs, top_k, top_p, kept", [
    ([0.4, 0.3, 0.2, 0.1], 0, 0.65, {0, 1}),          # the smallest set whose probability reaches p
    ([0.4, 0.3, 0.2, 0.1], 0, 0.75, {0, 1, 2}),
    ([0.4, 0.3, 0.2, 0.1], 2, 0.5, {0}),              # top-k first, the nucleus of the renormalised k
    ([0.4, 0.3, 0.2, 0.1], 3, 1.0, {0, 1, 2}),
    ([0.3, 0.3, 0.3, 0.1], 0, 0.5, {0, 1, 2}),        # a tie at the boundary keeps every tied token
    ([0.3, 0.3, 0.3, 0.1], 1, 1.0, {0, 1, 2}),        # so does the k-th logit's
])
def test_sampling_draws_from_the_documented_set(probs, top_k, top_p, kept):
    """`generate`'s draw (`sample`): temperature, then top-k, then top-p over the renormalised top k (HF's
    warper order); tokens tied with the last one kept are kept (exact ties only: e.g. bf16 logits). 4096
    rows drawn at once: every kept token (p >= 0.2 after renormalising) appears, nothing else does."""
    from snapkv_jax.generate import sample
    logits = np.log(np.tile(np.asarray(probs, np.float32), (4096, 1)))
    tokens = sample(jax.numpy.asarray(logits), jax.random.key(0), jax.numpy.float32(1.0), jax.numpy.float32(top_p),
                    greedy=False, top_k=top_k, use_top_p=top_p < 1.0)
    assert set(np.asarray(tokens).tolist()) == kept


def test_sampler_refuses_what_is_not_a_strategy_or_a_prompt():
    s = sk.Sampler(PARAMS, CFG, RAW)
    for call, message in [
        (lambda: s.generate("w1", sampling="greedy"), "sampling must be sk.Greedy()"),
        (lambda: s.generate(42), "prompts must be a string"),
        (lambda: s.generate([]), "prompts must be a string"),
        (lambda: s.generate(["w1", 3]), "a prompt must be a string or a list"),
        (lambda: s.generate(""), "empty prompt: '' encodes to no tokens"),
        (lambda: s.generate([{"role": "user", "content": "w1"}]), "messages need a chat template"),
        (lambda: s.generate("w1", max_new_tokens=0), "max_new_tokens must be a positive integer"),
        # the count is max_new_tokens' own, not "the prompt plus max_new_tokens" of a 1-token prompt (an audit)
        (lambda: s.generate(words(10), max_new_tokens=CFG.max_position_embeddings + 1),
         f"max_new_tokens alone needs {CFG.max_position_embeddings + 1} positions"),
        (lambda: s.generate("w1", sampling=sk.TopK(CFG.vocab_size + 1)), "top_k must be an integer in"),
        (lambda: sk.Sampler(PARAMS, CFG, RAW, chat_template="yes"), "chat_template must be 'auto' or False"),
        (lambda: sk.Sampler(PARAMS, CFG, CHAT).generate([{"text": "w1"}]), "prompt message 0 must be a dict with"),
        (lambda: sk.Sampler(PARAMS, CFG, RAW, eos_id=CFG.vocab_size), "eos_id=61 must be a token id in [0, 61)"),
        (lambda: sk.Sampler(PARAMS, CFG, RAW, compress="snapkv"), "compress must be None or a compression"),
        (lambda: sk.Sampler(PARAMS, CFG, RAW, chunk=0), "chunk must be 'auto', None or a positive integer, got 0"),
        (lambda: sk.Chat("not a sampler"), "Chat needs a snapkv_jax.Sampler, got str"),
        (lambda: s.generate("w1", stream="no"), "stream must be True or False, got 'no'"),
        (lambda: s.generate("w1", return_state=1), "return_state must be True or False, got 1"),
        (lambda: sk.Chat(s).send("w1", stream="yes"), "stream must be True or False, got 'yes'"),
        (lambda: sk.Sampler(PARAMS, CFG, None), "tokenizer must be a Hugging Face tokenizer"),
        (lambda: sk.Sampler(PARAMS, dict(vocab_size=61), RAW), "cfg must be a snapkv_jax.ModelConfig"),
        (lambda: sk.Sampler(PARAMS, CFG, CHAT).generate([{"role": 5, "content": "w1"}]),
         "prompt message 0 must be a dict with 'role' and 'content' strings"),
    ]:
        with pytest.raises(ValueError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value)


def test_numpy_integers_are_integers_to_the_sampler_and_chat():
    """A value a notebook computed with NumPy (`np.int64`) is taken as the int it is, as `generate` does."""
    s = sk.Sampler(PARAMS, CFG, RAW, compress=SNAP, eos_id=np.int64(1), stream_block=np.int64(4))
    assert (s.eos_id, s.stream_block) == (1, 4) and type(s.eos_id) is int and type(s.stream_block) is int
    chat = sk.Chat(s, recompress_at=np.int64(64))
    assert chat.recompress_at == 64 and type(chat.recompress_at) is int


# --- the sampler equals the engine ---------------------------------------------------------------

@pytest.mark.parametrize("strategy, kwargs", STRATEGIES, ids=lambda x: type(x).__name__)
def test_a_ragged_batch_equals_generate_for_every_strategy(strategy, kwargs):
    got = sk.Sampler(PARAMS, CFG, RAW).generate(PROMPTS, max_new_tokens=12, sampling=strategy, seed=3)
    want = engine_tokens(PROMPTS, max_new_tokens=12, seed=3, **kwargs)
    assert [list(c.tokens) for c in got] == want
    assert got == [RAW.decode(w, skip_special_tokens=True) for w in want]


def test_one_prompt_gives_a_string_with_its_compression_stats():
    out = sk.Sampler(PARAMS, CFG, RAW, compress=SNAP).generate(PROMPTS[0], max_new_tokens=5)
    assert isinstance(out, str) and out == RAW.decode(list(out.tokens), skip_special_tokens=True)
    assert list(out.tokens) == engine_tokens(PROMPTS[:1], SNAP, max_new_tokens=5)[0]
    st = out.stats
    assert (st.prompt_tokens, st.context_tokens, st.new_tokens) == (30, 30, len(out.tokens))
    assert st.kept_slots == (16, 16)                                            # capacity, every layer
    per_token = 2 * CFG.num_layers * CFG.num_kv_heads * CFG.head_dim * 4       # K and V, float32
    assert st.kv_bytes_full == per_token * (30 + st.new_tokens)
    assert st.kv_bytes_held == per_token * (16 + st.new_tokens)
    assert "kept prompt slots per layer: 16 in each of 2 layers" in st.report()
    assert "mode: snapkv(window=4, capacity=16" in st.report()


def test_a_sampler_shows_its_settings_not_its_weights():
    text = repr(sk.Chat(sk.Sampler(PARAMS, CFG, RAW, compress=SNAP), recompress_at=40))
    assert "SnapKV(window=4" in text and "recompress_at=40" in text and "Array" not in text


def test_chat_template_auto_templates_strings_false_sends_them_raw_messages_always():
    auto = sk.Sampler(PARAMS, CFG, CHAT)
    raw = sk.Sampler(PARAMS, CFG, CHAT, chat_template=False)
    templated = ids("user : w1 w2 </s> assistant :")
    assert auto.encode("w1 w2")[0] == templated
    assert raw.encode("w1 w2")[0] == ids("w1 w2")
    assert raw.encode([{"role": "user", "content": "w1 w2"}])[0] == templated
    assert sk.Sampler(PARAMS, CFG, RAW).encode("w1 w2")[0] == ids("w1 w2")      # no template: raw


# --- streaming -----------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", [sk.Greedy(), sk.TopP(0.8, temperature=1.2)], ids=["greedy", "top_p"])
def test_streamed_text_equals_the_non_streamed_text(strategy):
    s = sk.Sampler(PARAMS, CFG, RAW, compress=SNAP, stream_block=4)
    want = s.generate(PROMPTS, max_new_tokens=12, sampling=strategy, seed=5)
    stream = s.generate(PROMPTS, max_new_tokens=12, sampling=strategy, seed=5, stream=True)
    pieces = list(stream)
    assert len(pieces) > 2                                                       # it did come in pieces
    assert ["".join(p[r] for p in pieces) for r in range(3)] == want == stream.result
    assert [c.tokens for c in stream.result] == [c.tokens for c in want]


def test_block_decoding_leaves_generates_final_cache():
    tokens = np.array([ids(PROMPTS[0])], np.int32)
    out = sk.generate(PARAMS, CFG, tokens, max_new_tokens=9, compress=SNAP, temperature=0.9, seed=2)
    *_, (_, state) = decode_blocks.stream_generate(PARAMS, CFG, tokens, max_new_tokens=9, compress=SNAP,
                                                   temperature=0.9, seed=2, block=4)
    for a, b in zip(jax.tree_util.tree_leaves(out.cache), jax.tree_util.tree_leaves(state.cache)):
        np.testing.assert_array_equal(a, b)


def test_stream_generate_checks_its_cache_before_reading_it():
    """Before, a non-cache raised AttributeError and a cache of another batch NumPy's broadcast error
    (both from reading cache.next_pos); max_slots without a cache was ignored."""
    tokens = np.array([ids(PROMPTS[0])], np.int32)
    _, two = sk.prefill(PARAMS, CFG, np.concatenate([tokens, tokens]), max_slots=64)
    for cache, kwargs, message in ((object(), {}, "cache must be a snapkv_jax.KVCache"),
                                   (two, {}, "tokens have 1 rows but the cache has batch 2"),
                                   (None, dict(max_slots=99), "max_slots=99 bounds the growth")):
        with pytest.raises(ValueError, match=message) as info:
            decode_blocks.stream_generate(PARAMS, CFG, tokens, max_new_tokens=3, cache=cache, **kwargs)
        assert "\n" not in str(info.value)


class _Bytes:
    """A tokenizer whose tokens are UTF-8 bytes: most characters below span several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_detokenizing_never_splits_a_multibyte_character():
    text = "naïve café: 日本語 ✓ 🙂 done"
    data = list(text.encode())
    rows = _Detokenizer(_Bytes())
    pieces = [rows.push(data[i:i + 1]) for i in range(len(data))] + [rows.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len([p for p in pieces if p]) > len(text) // 2                       # pieces come as they complete


def test_incremental_detokenizing_with_space_clean_up_adds_up_to_the_decoded_text():
    """A tokenizer with `clean_up_tokenization_spaces` rewrites text a later token completes ("w5 '" then
    "w5'w6"). Before, the stream had returned "w5 '" and, its text no longer a prefix, nothing after it."""
    vocab = WORDS[:-4] + ["'", ".", "n't", "'ve"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cleaning = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>",
                                       clean_up_tokenization_spaces=True)
    words_ = "w5 ' w6 w7 . w8 n't w9 w10 've w11 w12 w13".split()
    row = _Detokenizer(cleaning)
    pieces = [row.push([vocab.index(w)]) for w in words_] + [row.flush()]
    whole = cleaning.decode([vocab.index(w) for w in words_])
    assert "".join(pieces) == whole == "w5'w6 w7. w8n't w9 w10've w11 w12 w13"
    assert len([p for p in pieces[:-1] if p]) >= 5                               # pieces come as they settle


# --- compiles ------------------------------------------------------------------------------------

PROGRAMS = ("_layer", "_decode_loop", "_block")                  # layer prefill, decode loop, streamed block


def test_changing_max_new_tokens_within_a_bucket_compiles_nothing_new():
    s = sk.Sampler(PARAMS, CFG, RAW)
    s.generate(PROMPTS, max_new_tokens=3)
    with lowered(*PROGRAMS) as counts:
        for n in (7, 20, 32):                                                    # bucket 32, prompts in 32
            assert all(len(c.tokens) <= n for c in s.generate(PROMPTS, max_new_tokens=n))
        s.generate([words(25, 1), words(4), words(31)], max_new_tokens=9)       # other prompts, same bucket
    assert counts == {}


def test_streaming_with_other_max_new_tokens_compiles_nothing_new():
    s = sk.Sampler(PARAMS, CFG, RAW, stream_block=4)
    list(s.generate(PROMPTS[0], max_new_tokens=5, stream=True))
    with lowered(*PROGRAMS) as counts:
        list(s.generate(PROMPTS[0], max_new_tokens=11, stream=True))
    assert counts == {}


# --- state ---------------------------------------------------------------------------------------

def test_the_state_holds_each_row_up_to_its_last_token_also_when_it_stopped_early():
    """A row that emitted EOS appends nothing more while the others decode on."""
    out, state = sk.Sampler(PARAMS, CFG, RAW).generate(PROMPTS, max_new_tokens=8, return_state=True)
    assert out[0].tokens == (1,) and len(out[1].tokens) == 8                     # row 0: EOS at once
    prompt = np.array([len(ids(p)) for p in PROMPTS])
    n = np.array([len(c.tokens) for c in out])
    np.testing.assert_array_equal(state.positions, prompt + n)
    np.testing.assert_array_equal(jax.device_get(state.cache.next_pos), prompt + n - 1)
    for p in state.cache.pos:                                                    # full cache: 0 .. P-2 held
        held = np.asarray(p)[:, 0]                                               # [B, S], KV head 0
        assert [sorted(row[row >= 0].tolist()) for row in held] == [list(range(m)) for m in prompt + n - 1]
    assert state.token.tolist() == [c.tokens[-1] for c in out]


# --- continuing: last_state and chat --------------------------------------------------------------

def test_a_state_whose_parts_disagree_is_refused_in_one_line():
    """A State assembled or edited by hand: its parts must be one per row of its cache."""
    s = sk.Sampler(PARAMS, CFG, RAW)
    _, state = s.generate(PROMPTS[:2], max_new_tokens=2, return_state=True)
    for bad, message in [
        (dataclasses.replace(state, cache=None), "last_state.cache must be a snapkv_jax.KVCache, got NoneType"),
        (dataclasses.replace(state, token=state.token[:1]), r"last_state.token must hold one entry per row .*\(1,\)"),
        (dataclasses.replace(state, answers=state.answers * 2), "last_state.answers must hold one entry per row"),
        (dataclasses.replace(state, messages=None), r"last_state.messages must hold one entry per row .*\(\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            s.generate(["w1", "w2"], max_new_tokens=2, last_state=bad)
    s.generate(["w1", "w2"], max_new_tokens=2, last_state=state)


def test_last_state_continues_like_one_generate_over_the_concatenated_turns():
    """Full cache, greedy: turn 2 from the state equals `generate` over turn 1 + answer 1 + turn 2, per row
    of a ragged batch (rows stopping at different steps included)."""
    s = sk.Sampler(PARAMS, CFG, RAW)
    first, state = s.generate(PROMPTS, max_new_tokens=6, return_state=True)
    second_turns = [words(5, 11), words(12, 2), words(3, 40)]
    second = s.generate(second_turns, max_new_tokens=8, last_state=state)
    whole = [f"{p} {RAW.decode(list(a.tokens))} {t}" for p, a, t in zip(PROMPTS, first, second_turns)]
    assert [list(c.tokens) for c in second] == engine_tokens(whole, max_new_tokens=8)
    pieces = list(s.generate(second_turns, max_new_tokens=8, last_state=state, stream=True))
    assert ["".join(p[r] for p in pieces) for r in range(3)] == second


def test_chat_sends_turns_over_one_cache_and_keeps_the_history():
    chat = sk.Chat(sk.Sampler(PARAMS, CFG, CHAT))
    a = chat.send(words(20), max_new_tokens=4)
    stream = chat.send(words(6, 9), max_new_tokens=4, stream=True)                # turn 2 streamed
    with pytest.raises(ValueError, match="the last streamed answer is not finished"):
        chat.history
    b = "".join(stream)
    assert [m["role"] for m in chat.history] == ["user", "assistant"] * 2
    assert chat.history[1]["content"] == a and chat.history[3]["content"] == b == stream.result
    st = stream.result.stats
    assert int(jax.device_get(chat.cache.next_pos)[0]) == st.context_tokens + st.new_tokens - 1
    # The turn's segment is the template's text between answer 1 and the generation prompt of turn 2.
    whole = CHAT.apply_chat_template(chat.history[:3], add_generation_prompt=True, tokenize=False)
    assert st.context_tokens == len(ids(whole))
    chat.reset()
    assert chat.history == [] and chat.cache is None


def test_a_stream_cut_off_by_ctrl_c_drops_its_turn_and_the_chat_goes_on(monkeypatch):
    """Ctrl-C while an answer streams closes the stream for good. Before, the chat then refused every
    `send` and `history` ("iterate its Stream to the end first", which yields nothing more) until `reset()`
    forgot the whole conversation; now the cut-off turn is dropped and the chat is at its last full turn."""
    from snapkv_jax import sampler as sampler_lib
    chat = sk.Chat(sk.Sampler(PARAMS, CFG, CHAT))
    chat.send(words(8), max_new_tokens=3)
    history, cache = chat.history, chat.cache

    real = sampler_lib.stream_generate

    def interrupted(*args, **kwargs):            # Ctrl-C after the first block
        blocks = real(*args, **kwargs)
        yield next(blocks)
        raise KeyboardInterrupt

    monkeypatch.setattr(sampler_lib, "stream_generate", interrupted)
    stream = chat.send(words(5, 3), max_new_tokens=8, stream=True)
    with pytest.raises(KeyboardInterrupt):
        list(stream)
    monkeypatch.undo()
    assert chat.history == history and chat.cache is cache
    assert stream.failed and stream.result is None and list(stream) == []
    again = chat.send(words(6, 9), max_new_tokens=4)
    clean = sk.Chat(chat.sampler)
    clean.send(words(8), max_new_tokens=3)
    assert again == clean.send(words(6, 9), max_new_tokens=4) and chat.history == clean.history


def test_a_stream_left_by_break_is_refused_until_closed_through_the_chat():
    """`for piece in chat.send(..., stream=True): break` leaves no name for the stream: the next send is
    refused, naming `chat.pending.close()`, which drops the turn; the chat then goes on from its last full
    turn, as one that never had it."""
    chat = sk.Chat(sk.Sampler(PARAMS, CFG, CHAT))
    chat.send(words(8), max_new_tokens=3)
    history, cache = chat.history, chat.cache
    assert chat.pending is None
    for _ in chat.send(words(5, 3), max_new_tokens=8, stream=True, sampling=sk.Greedy()):
        break
    with pytest.raises(ValueError, match=re.escape("or chat.pending.close() to drop that turn")):
        chat.send(words(6, 9), max_new_tokens=4)
    stream = chat.pending
    stream.close()
    assert chat.pending is None and stream.failed and stream.result is None and list(stream) == []
    assert chat.history == history and chat.cache is cache
    again = chat.send(words(6, 9), max_new_tokens=4)
    clean = sk.Chat(chat.sampler)
    clean.send(words(8), max_new_tokens=3)
    assert again == clean.send(words(6, 9), max_new_tokens=4) and chat.history == clean.history
    finished = chat.send(words(4, 1), max_new_tokens=2, stream=True)
    pieces = list(finished)
    finished.close()                                                            # exhausted: a no-op
    assert finished.done and not finished.failed and "".join(pieces) == str(finished.result)


def test_a_stream_left_open_at_reset_never_feeds_the_chat_again():
    """Before, finishing a stream opened before `reset()` appended its turn (and set its cache) on top of
    the conversation begun after the reset."""
    chat = sk.Chat(sk.Sampler(PARAMS, CFG, CHAT))
    chat.send(words(8), max_new_tokens=3)
    old = chat.send(words(5, 3), max_new_tokens=4, stream=True)
    chat.reset()
    chat.send(words(6, 20), max_new_tokens=3)
    history, cache = chat.history, chat.cache
    "".join(old)
    assert old.done and chat.history == history and chat.cache is cache


def test_chat_with_recompress_at_never_holds_more_than_n_slots():
    n = SNAP.capacity + 8
    chat = sk.Chat(sk.Sampler(PARAMS, CFG, CHAT, compress=SNAP), recompress_at=n)
    for turn in range(4):
        chat.send(words(10, turn), max_new_tokens=6)
        live = int(np.asarray(kv.valid_slots(chat.cache)).max())
        assert live <= n, f"turn {turn}: {live} live slots > recompress_at={n}"
    assert chat.history[-2]["content"] == words(10, 3)
    small = sk.Chat(chat.sampler, recompress_at=20)
    small.send(words(3), max_new_tokens=4)
    with pytest.raises(ValueError, match="recompress_at=20 must be an integer >= the method's 16 slots"):
        small.send(words(3), max_new_tokens=10)                                 # 16 + 10 - 1 > 20
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 'ten'"):
        small.send(words(3), max_new_tokens="ten")                              # not a TypeError


def test_chat_with_recompress_at_refuses_a_first_turn_it_cannot_bound():
    """Turn 1 is compressed by prefill to the method's 16 slots, + 9 fed answer tokens: 25 > 20. Before,
    the first turn went through holding 25 slots and only the second was refused."""
    chat = sk.Chat(sk.Sampler(PARAMS, CFG, CHAT, compress=SNAP), recompress_at=20)
    with pytest.raises(ValueError, match="recompress_at=20 must be an integer >= the method's 16 slots"):
        chat.send(words(30), max_new_tokens=10)
    assert chat.cache is None and chat.history == []


def test_recompress_at_with_a_method_that_cannot_reselect_a_live_cache_is_refused_up_front():
    """KVzip cannot re-compress a live cache (its scores need a reconstruction pass). Before, a Chat with
    it and recompress_at was built, its first turn answered, and the turn that had to re-compress failed
    inside extend; now the Chat and a continuation with recompress_at refuse it before any prefill."""
    kvzip = sk.KVzip.from_tokenizer(RAW, 16)
    sampler = sk.Sampler(PARAMS, CFG, CHAT, compress=kvzip)
    with pytest.raises(ValueError, match="recompress_at needs a method that can re-compress a live cache; KVzip"):
        sk.Chat(sampler, recompress_at=40)
    first, state = sampler.generate(words(10), max_new_tokens=4, return_state=True)
    with pytest.raises(ValueError, match="recompress_at needs a method that can re-compress a live cache; KVzip"):
        sampler.generate(words(3), max_new_tokens=4, last_state=state, recompress_at=1000)
    assert sampler.generate(words(3), max_new_tokens=4, last_state=state).stats.new_tokens >= 1


def test_turn_segments_on_smollm2s_template_rebuild_the_whole_conversation():
    """The default model's ChatML template: turn 1's prompt + its answer (EOS included) + turn 2's segment
    are exactly the ids of the whole conversation templated at once (tokenizer only; no model runs)."""
    from transformers import AutoTokenizer
    pytest.importorskip("gguf", reason="the default model's reader needs gguf (not on the GPU machine)")

    from snapkv_jax.default_model import default_checkpoint_dir
    tok = AutoTokenizer.from_pretrained(default_checkpoint_dir())
    s = sk.Sampler(PARAMS, CFG, tok)                   # the tiny model: only the tokenizer is used
    first, messages = s.encode("What is the capital of France?")
    answer = tok("The capital of France is Paris.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    state = sk.State(cache=None, token=np.array([answer[-1]]), positions=np.array([len(first) + len(answer)]),
                     messages=(messages,), answers=(tuple(answer),))
    segment, history = s._turn_ids(state, 0, answer, "And of Spain?")
    whole = tok.apply_chat_template(list(history), add_generation_prompt=True, tokenize=False)
    assert first + answer + segment == tok(whole, add_special_tokens=False)["input_ids"]
    assert history[1] == {"role": "assistant", "content": "The capital of France is Paris."}
