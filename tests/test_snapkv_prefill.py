"""SnapKV inside prefill and generate: DESIGN section 3 invariants 2 and 3, per-layer compression,
and the generate loop's bucketing, seeding and EOS handling."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import snapkv_jax as sk
from snapkv_jax.compression import window_queries
from snapkv_jax.models.llama import Llama

from tests.compile_log import lowered

CFG = sk.ModelConfig.tiny(num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=61)


@functools.cache
def params():
    return sk.init_params(CFG, jax.random.key(0))


@st.composite
def snapped_prompts(draw):
    window = draw(st.integers(1, 4))
    capacity = draw(st.integers(window + 1, 12))
    snap = sk.SnapKV(window=window, capacity=capacity, kernel=draw(st.sampled_from([1, 3, 5])),
                           pooling=draw(st.sampled_from(["maxpool", "avgpool", "none"])),
                           gqa_reduce=draw(st.sampled_from(["mean", "max"])))
    width = draw(st.sampled_from([capacity + 1, 24]))
    batch = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(1, width), min_size=batch, max_size=batch))
    tokens = np.random.default_rng(draw(st.integers(0, 999))).integers(0, 61, (batch, width))
    return snap, tokens.astype(np.int32), np.array(lengths, np.int32)


@given(snapped_prompts())
def test_long_rows_keep_capacity_slots_with_the_window(case):
    """Invariant 2: rows longer than C keep exactly C unique positions < L per (layer, KV head), the last
    w among them, and decoding continues at position L."""
    snap, tokens, lengths = case
    _, cache = sk.prefill(params(), CFG, tokens, lengths, compress=snap)
    assert cache.slots == snap.capacity
    for b, length in enumerate(lengths):
        if length <= snap.capacity:
            continue
        assert int(cache.end[b]) == snap.capacity and int(cache.next_pos[b]) == length
        for pos in cache.pos:
            for kept in np.asarray(pos[b]):                                       # [C] per KV head
                assert (kept >= 0).all() and len(set(kept)) == snap.capacity
                assert (kept < length).all()
                assert set(range(length - snap.window, length)) <= set(kept)


@given(snapped_prompts())
def test_short_rows_are_untouched(case):
    """Invariant 3: rows with L <= C hold what a prefill without SnapKV holds, slot for slot."""
    snap, tokens, lengths = case
    _, snapped = sk.prefill(params(), CFG, tokens, lengths, compress=snap, max_slots=tokens.shape[1])
    _, full = sk.prefill(params(), CFG, tokens, lengths)
    for b, length in enumerate(lengths):
        if length > snap.capacity:
            continue
        assert int(snapped.end[b]) == length and int(snapped.next_pos[b]) == length
        for layer in range(CFG.num_layers):
            pos = np.asarray(full.pos[layer][b])                                   # [K, T]
            np.testing.assert_array_equal(snapped.pos[layer][b], pos)
            # Empty slots' contents are never read. Held ones agree to float32 rounding: the two
            # prefills are different compiled programs, and XLA may fuse the layers differently.
            held = pos >= 0
            for got, want in ((snapped.k, full.k), (snapped.v, full.v)):
                np.testing.assert_allclose(np.asarray(got[layer][b])[held], np.asarray(want[layer][b])[held],
                                           atol=1e-6, rtol=0)


def test_kept_positions_are_what_select_picks_from_the_layer():
    """The cache of layer 0 holds exactly `snapkv.select` of layer 0's window queries and keys."""
    snap = sk.SnapKV(window=4, capacity=10, kernel=3)
    tokens = np.random.default_rng(5).integers(0, 61, (2, 30)).astype(np.int32)
    lengths = np.array([30, 17], np.int32)

    def layer0(model, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        _, q, k, _ = model.layers[0].prompt(model.embed(tokens), positions)
        return q, k.transpose(0, 2, 1, 3)

    q, k = Llama(CFG).apply({"params": params()}, tokens, method=layer0)
    want = sk.snapkv.select(window_queries(q.transpose(0, 2, 1, 3), jnp.asarray(lengths), 4), k,
                            jnp.asarray(lengths), snap, impl="xla")
    _, cache = sk.prefill(params(), CFG, tokens, lengths, compress=snap, snap_impl="xla")
    np.testing.assert_array_equal(cache.pos[0], want)


@pytest.mark.parametrize("width", [12, 40])
def test_generate_with_capacity_above_lengths_equals_full_cache(width):
    """Invariant 3 end to end: C >= every prompt length gives the full cache's tokens, whether or not the
    batch is wider than C (the compressed path runs only when it is)."""
    rng = np.random.default_rng(width)
    tokens = rng.integers(0, 61, (3, width)).astype(np.int32)
    lengths = np.array([width // 3, width // 2, 9], np.int32)
    snap = sk.SnapKV(window=4, capacity=20)
    full = sk.generate(params(), CFG, tokens, lengths, max_new_tokens=12, bucket=False)
    snapped = sk.generate(params(), CFG, tokens, lengths, max_new_tokens=12, compress=snap, bucket=False)
    np.testing.assert_array_equal(snapped.tokens, full.tokens)


PROGRAMS = ("_layer", "_decode_loop")                                      # layer prefill, decode loop


def test_generate_does_not_recompile_within_a_bucket():
    rng = np.random.default_rng(7)
    sk.generate(params(), CFG, rng.integers(0, 61, (1, 35)), max_new_tokens=3)
    with lowered(*PROGRAMS) as counts:
        out = sk.generate(params(), CFG, rng.integers(0, 61, (1, 41)), max_new_tokens=3)   # same bucket, 48
    assert counts == {}
    assert out.tokens.shape == (1, 3)


def test_changing_max_new_tokens_within_a_bucket_does_not_recompile():
    """max_new_tokens is bucketed like prompt widths (32, 48, 64, ...): 3, 17 and 32 share one program."""
    tokens = np.random.default_rng(12).integers(0, 61, (2, 20))
    sk.generate(params(), CFG, tokens, max_new_tokens=3)
    with lowered(*PROGRAMS) as counts:
        for n in (17, 32):
            out = sk.generate(params(), CFG, tokens, max_new_tokens=n)
            assert out.tokens.shape == (2, n)
    assert counts == {}
    # A config of its own (the same weights fit it), so that no other test compiled the next bucket's
    # programs for it before: a new bucket is a new cache width, one layer program (its output is padded
    # to that width) and one decode loop, and nothing more.
    cfg = dataclasses.replace(CFG, max_position_embeddings=CFG.max_position_embeddings + 1)
    sk.generate(params(), cfg, tokens, max_new_tokens=3)
    with lowered(*PROGRAMS) as counts:
        sk.generate(params(), cfg, tokens, max_new_tokens=33)                     # the next bucket, 48
    assert counts == {"_layer": 1, "_decode_loop": 1}


def test_same_seed_same_tokens_other_seed_other_tokens():
    tokens = np.random.default_rng(8).integers(0, 61, (2, 10))
    kwargs = dict(max_new_tokens=16, temperature=1.5, top_k=40, top_p=0.95)
    a = sk.generate(params(), CFG, tokens, seed=1, **kwargs)
    b = sk.generate(params(), CFG, tokens, seed=1, **kwargs)
    c = sk.generate(params(), CFG, tokens, seed=2, **kwargs)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_top_k_one_is_greedy():
    tokens = np.random.default_rng(9).integers(0, 61, (2, 10))
    greedy = sk.generate(params(), CFG, tokens, max_new_tokens=8)
    topk1 = sk.generate(params(), CFG, tokens, max_new_tokens=8, temperature=0.7, top_k=1, seed=3)
    np.testing.assert_array_equal(topk1.tokens, greedy.tokens)


def test_eos_stops_one_row_while_others_continue():
    tokens = np.random.default_rng(11).integers(0, 61, (2, 10))
    free = np.asarray(sk.generate(params(), CFG, tokens, max_new_tokens=10).tokens)
    # An EOS that row 0 emits first at `step` and row 1 never emits.
    step = next(i for i in range(1, 10) if free[0, i] not in free[1] and free[0, i] not in free[0, :i])
    eos = int(free[0, step])
    out = sk.generate(params(), CFG, tokens, max_new_tokens=10, eos_id=eos)
    assert int(out.lengths[0]) == step + 1 and int(out.lengths[1]) == 10
    np.testing.assert_array_equal(out.tokens[0, :step + 1], free[0, :step + 1])
    assert (np.asarray(out.tokens[0, step + 1:]) == eos).all()                  # the pad id is the EOS
    np.testing.assert_array_equal(out.tokens[1], free[1])
