"""DESIGN section 3 invariants 1, 4 and 5 as hypothesis properties over random shapes.

1. After prefill without SnapKV, slot i of row b holds position i for i < lengths[b], and -1 beyond.
4. Padding positions are never held; row b's cache does not depend on other rows of the batch.
5. decode_step never writes past `slots`; a full cache raises a clear error before jit.
"""

import functools

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import snapkv_jax as sk

# (layers, heads, kv_heads): GQA ratios 1, 2, 3, 4.
SHAPES = [(1, 2, 2), (2, 4, 2), (1, 6, 2), (3, 4, 1)]


@functools.cache
def model(layers, heads, kv_heads):
    cfg = sk.ModelConfig.tiny(num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, vocab_size=61)
    return cfg, sk.init_params(cfg, jax.random.key(layers * 100 + heads * 10 + kv_heads))


@st.composite
def prompts(draw):
    layers, heads, kv_heads = draw(st.sampled_from(SHAPES))
    batch = draw(st.integers(1, 3))
    width = draw(st.sampled_from([1, 5, 12]))
    lengths = np.array(draw(st.lists(st.integers(1, width), min_size=batch, max_size=batch)), np.int32)
    seed = draw(st.integers(0, 2**16))
    tokens = np.random.default_rng(seed).integers(0, 61, (batch, width)).astype(np.int32)
    extra = draw(st.sampled_from([0, 1, 3]))
    return (layers, heads, kv_heads), tokens, lengths, extra


@given(prompts())
def test_prefill_slot_i_holds_position_i(case):
    shape, tokens, lengths, extra = case
    cfg, params = model(*shape)
    _, cache = sk.prefill(params, cfg, tokens, lengths, max_slots=tokens.shape[1] + extra)
    slots = tokens.shape[1] + extra
    i = np.arange(slots)
    want = np.where(i[None, :] < lengths[:, None], i[None, :], -1)               # [B, S]
    assert cache.num_layers == cfg.num_layers
    for layer in range(cfg.num_layers):
        assert cache.k[layer].shape == (len(lengths), cfg.num_kv_heads, slots, cfg.head_dim)
        pos = np.asarray(cache.pos[layer])
        np.testing.assert_array_equal(pos, np.broadcast_to(want[:, None], pos.shape))
    np.testing.assert_array_equal(cache.end, lengths)
    np.testing.assert_array_equal(cache.next_pos, lengths)


@given(prompts())
def test_rows_do_not_depend_on_other_rows_or_padding(case):
    shape, tokens, lengths, extra = case
    cfg, params = model(*shape)
    slots = tokens.shape[1] + extra
    logits, cache = sk.prefill(params, cfg, tokens, lengths, max_slots=slots)
    for b in range(len(lengths)):
        row = tokens[b:b + 1].copy()
        row[:, lengths[b]:] = 0                      # other padding content
        alone_logits, alone = sk.prefill(params, cfg, row, lengths[b:b + 1], max_slots=slots)
        np.testing.assert_allclose(logits[b], alone_logits[0], atol=1e-5, rtol=0)
        for layer in range(cfg.num_layers):
            valid = np.asarray(cache.pos[layer][b]) >= 0
            assert (np.asarray(cache.pos[layer][b])[valid] < lengths[b]).all()  # no padding position
            np.testing.assert_allclose(np.asarray(cache.k[layer][b])[valid],
                                       np.asarray(alone.k[layer][0])[valid], atol=1e-5, rtol=0)


@given(prompts(), st.integers(0, 4))
def test_decode_never_writes_past_slots(case, steps):
    shape, tokens, lengths, extra = case
    cfg, params = model(*shape)
    slots = tokens.shape[1] + extra
    logits, cache = sk.prefill(params, cfg, tokens, lengths, max_slots=slots)
    for step in range(steps):
        if int(np.max(cache.end)) >= slots:
            with pytest.raises(ValueError, match=f"KV cache is full: row .* all {slots} slots"):
                sk.decode_step(params, cfg, np.argmax(logits, -1), cache)
            return
        logits, cache = sk.decode_step(params, cfg, np.argmax(logits, -1), cache)
        assert cache.slots == slots
        for layer in range(cfg.num_layers):
            pos = np.asarray(cache.pos[layer])                                    # [B, K, S]
            i = np.arange(slots)
            want = np.where(i[None] < (lengths + step + 1)[:, None], i[None], -1)  # [B, S]
            np.testing.assert_array_equal(pos, np.broadcast_to(want[:, None], pos.shape))
        np.testing.assert_array_equal(cache.end, lengths + step + 1)


@given(batch=st.integers(1, 3), chunk=st.sampled_from([1, 4, 9]), slots=st.sampled_from([4, 9, 16]),
       kv_heads=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_a_segment_written_from_the_front_equals_the_scatter(batch, chunk, slots, kv_heads, seed):
    """`write_segment(from_front=True)` into an empty layer (a question's start on a shared context: row b's
    real tokens to slots 0, 1, ..., its padding dropped) gives the scatter's arrays bit for bit, also when
    the chunk is wider than the layer (it then scatters)."""
    from snapkv_jax import cache as kv
    rng = np.random.default_rng(seed)
    d = 4
    k_new, v_new = (jax.numpy.asarray(rng.normal(size=(batch, chunk, kv_heads, d)), jax.numpy.float32) for _ in "kv")
    new = rng.integers(1, min(chunk, slots) + 1, batch)                          # real tokens per row
    i = np.arange(chunk)
    write = np.where(i[None, :] < new[:, None], i[None, :], slots).astype(np.int32)  # [B, c]: padding dropped
    positions = (rng.integers(0, 100, (batch, 1)) + i[None, :]).astype(np.int32)
    empty = kv.pad_slots(np.zeros((batch, kv_heads, 0, d), np.float32), np.zeros((batch, kv_heads, 0, d), np.float32),
                         np.zeros((batch, kv_heads, 0), np.int32), slots)
    scattered = kv.write_segment(*empty, k_new, v_new, write, positions)
    front = kv.write_segment(*empty, k_new, v_new, write, positions, from_front=True)
    for a, b in zip(front, scattered, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
