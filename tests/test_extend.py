"""`sk.extend`: appending a ragged segment to a live cache equals feeding it one `decode_step` at a time
and, for a full cache, prefilling the concatenation; re-compression of the live cache keeps what a NumPy
oracle computes from the live keys and the segment's window queries; the cache grows in width buckets up
to `max_slots`; bad input is refused in one line before anything runs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import snapkv_jax as sk
from snapkv_jax.generate import bucket_width, free_slots, prompt_slots
from snapkv_jax import cache as kv
from tests.test_snapkv_select import is_valid_top_k, oracle_pool

METHODS = {
    "full": None,
    "snapkv": sk.SnapKV(window=4, capacity=14, kernel=3),
    "streamingllm": sk.StreamingLLM(capacity=12, sinks=2),
    "h2o": sk.H2O(capacity=14, window=4),
    "h2o-normalized": sk.H2O(capacity=14, window=4, normalize=True),
    "random": sk.RandomKV(capacity=14, window=4, seed=5),
    "pyramidkv": sk.PyramidKV(capacity=14, window=4, beta=4),
    "adakv": sk.AdaKV(capacity=14, window=4, alpha=0.25),
}
CONFIGS = {
    "gqa": sk.ModelConfig.tiny(),                                   # 4 query heads over 2 KV heads
    "mha-sliding": sk.ModelConfig.tiny(num_kv_heads=4, sliding_window=9),
}


def _params(cfg):
    return sk.init_params(cfg, jax.random.key(2))


def _tokens(cfg, rows, width, seed):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (rows, width)).astype(np.int32)


PROMPT_LENGTHS = np.array([30, 9, 21], np.int32)      # ragged: the middle row is never compressed
SEGMENT_LENGTHS = np.array([7, 3, 1], np.int32)


def _live(cache, layer, row):
    """{position: (k, v)} of one row's occupied slots in one layer, per KV head (a list over heads)."""
    k, v, pos = (np.asarray(a[layer][row]) for a in (cache.k, cache.v, cache.pos))
    return [{int(p): (k[h, s], v[h, s]) for s, p in enumerate(pos[h]) if p >= 0} for h in range(pos.shape[0])]


def assert_same_live_slots(a, b, row_a, row_b, layers):
    """Both caches hold the same positions in the same slots of every layer and head, with K/V to 1e-5."""
    for layer in range(layers):
        pa, pb = np.asarray(a.pos[layer][row_a]), np.asarray(b.pos[layer][row_b])
        width = min(pa.shape[-1], pb.shape[-1])
        np.testing.assert_array_equal(pa[:, :width], pb[:, :width], err_msg=f"layer {layer}")
        assert (pa[:, width:] < 0).all() and (pb[:, width:] < 0).all()
        for head_a, head_b in zip(_live(a, layer, row_a), _live(b, layer, row_b)):
            for p in head_a:
                np.testing.assert_allclose(head_a[p][0], head_b[p][0], atol=1e-5)
                np.testing.assert_allclose(head_a[p][1], head_b[p][1], atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_then_extend_equals_prefill_of_the_concatenation(name):
    cfg = CONFIGS[name]
    params = _params(cfg)
    a, b = _tokens(cfg, 3, 30, 0), _tokens(cfg, 3, 7, 1)
    logits, cache = sk.extend(params, cfg, sk.prefill(params, cfg, a, PROMPT_LENGTHS)[1], b, SEGMENT_LENGTHS)
    both = np.zeros((3, 37), np.int32)
    for r, (la, lb) in enumerate(zip(PROMPT_LENGTHS, SEGMENT_LENGTHS)):
        both[r, :la + lb] = np.concatenate([a[r, :la], b[r, :lb]])
    ref_logits, ref = sk.prefill(params, cfg, both, PROMPT_LENGTHS + SEGMENT_LENGTHS)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    np.testing.assert_array_equal(cache.next_pos, ref.next_pos)
    for r in range(3):
        assert_same_live_slots(cache, ref, r, r, cfg.num_layers)


# KVzip compresses the prompt (it cannot re-select a live cache): its caches are extended as they are.
PREFILLED = METHODS | {"kvzip": sk.KVzip(capacity=14, sinks=2, chunk=16, repeat=(5, 6, 7), resume=(8, 9),
                                         suffix=(10,), overlap=3)}


@pytest.mark.parametrize("method", PREFILLED.values(), ids=PREFILLED.keys())
@pytest.mark.parametrize("name", CONFIGS)
def test_extend_equals_one_decode_step_per_token(name, method):
    cfg = CONFIGS[name]
    params = _params(cfg)
    room = int(SEGMENT_LENGTHS.max())
    needed = prompt_slots(cfg, 30, method)
    _, cache = sk.prefill(params, cfg, _tokens(cfg, 3, 30, 0), PROMPT_LENGTHS, compress=method,
                          max_slots=needed + room)
    segment = _tokens(cfg, 3, room, 1)
    logits, extended = sk.extend(params, cfg, cache, segment, SEGMENT_LENGTHS)
    assert [k.shape for k in extended.k] == [k.shape for k in cache.k]      # it fitted: no growth
    for r, n in enumerate(SEGMENT_LENGTHS):
        stepped = kv.take_rows(cache, [r])
        for i in range(n):
            step_logits, stepped = sk.decode_step(params, cfg, segment[r, i:i + 1], stepped)
        np.testing.assert_allclose(logits[r], step_logits[0], atol=1e-5, err_msg=f"row {r}")
        assert int(stepped.next_pos[0]) == int(extended.next_pos[r])
        assert_same_live_slots(extended, stepped, r, 0, cfg.num_layers)


CHUNKED = {"full": None, "snapkv": METHODS["snapkv"], "h2o": METHODS["h2o"], "adakv": METHODS["adakv"]}


@pytest.mark.parametrize("method", CHUNKED.values(), ids=CHUNKED.keys())
def test_a_segment_in_chunks_equals_it_whole(method):
    """chunk=4 and 5 (11 tokens in 3 chunks, the last partial; the observation window and H2O's running
    scores spanning chunks) give the logits and kept slots of the whole segment at once, re-compressing
    too, and rows over a shared context the same."""
    cfg = CONFIGS["gqa"]
    params = _params(cfg)
    _, cache = sk.prefill(params, cfg, _tokens(cfg, 3, 30, 0), PROMPT_LENGTHS)
    segment, lengths = _tokens(cfg, 3, 11, 1), np.array([11, 6, 1], np.int32)
    _, ctx = sk.prefill(params, cfg, _tokens(cfg, 1, 25, 2))
    calls = [lambda chunk: sk.extend(params, cfg, cache, segment, lengths, compress=method, chunk=chunk)]
    if method is None:
        calls.append(lambda chunk: sk.extend(params, cfg, None, segment, lengths, context=ctx, chunk=chunk))
    for call in calls:
        whole_logits, whole = call(None)
        for chunk in (4, 5):
            logits, got = call(chunk)
            np.testing.assert_allclose(logits, whole_logits, atol=1e-5, err_msg=f"chunk={chunk}")
            for r in range(3):
                assert_same_live_slots(got, whole, r, r, cfg.num_layers)


def test_cache_grows_to_a_width_bucket_and_keeps_widths_across_turns():
    cfg = CONFIGS["gqa"]
    params = _params(cfg)
    _, cache = sk.prefill(params, cfg, _tokens(cfg, 2, 30, 0), [30, 12])
    assert cache.slots == 30
    _, cache = sk.extend(params, cfg, cache, _tokens(cfg, 2, 5, 1), [5, 2])
    assert cache.slots == bucket_width(35) == 48
    _, again = sk.extend(params, cfg, cache, _tokens(cfg, 2, 5, 2), [5, 5])
    assert again.slots == 48                                               # 40 slots fit in 48
    with pytest.raises(ValueError, match=r"needs 53 slots .*max_slots=50"):
        sk.extend(params, cfg, again, _tokens(cfg, 2, 13, 3), [13, 1], max_slots=50)
    _, capped = sk.extend(params, cfg, again, _tokens(cfg, 2, 13, 3), [13, 1], max_slots=60)
    assert capped.slots == 60                                              # bucket 64, capped


def test_max_slots_bounds_what_generate_caches_not_its_bucketed_budget():
    """A continuation's decode budget is a width bucket (32 for 4 tokens), and its last token is never
    cached: `max_slots` refuses only a growth past the segment plus max_new_tokens - 1. 5 + 4 fit in 8
    slots (the budget's room shrinks to them; tokens equal an unbucketed run's), 5 + 5 do not, for rows on
    a shared context and for a cache; a NumPy max_slots works; a cache already wider than max_slots
    continues when it needs no growth; a full cache of rows on a context is told to extend, not prefill (an
    audit found each of these refused, failing or misleading)."""
    from snapkv_jax.decode_blocks import stream_generate
    cfg = CONFIGS["gqa"]
    params = _params(cfg)
    _, ctx = sk.prefill(params, cfg, _tokens(cfg, 1, 12, 0))
    q = _tokens(cfg, 2, 5, 1)
    _, cache = sk.prefill(params, cfg, _tokens(cfg, 2, 6, 2))
    for where, width in ((dict(context=ctx), 8), (dict(cache=cache), 14)):
        out = sk.generate(params, cfg, q, max_new_tokens=4, max_slots=np.uint64(width), **where)
        plain = sk.generate(params, cfg, q, max_new_tokens=4, bucket=False, **where)   # the cache's last
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(plain.tokens))
        assert out.cache.slots == width
        with pytest.raises(ValueError, match=rf"needs {width + 1} slots .*\+ 5 to generate.*max_slots={width}$"):
            sk.generate(params, cfg, q, max_new_tokens=5, max_slots=width, **where)
    streamed = np.concatenate([new for new, _ in stream_generate(params, cfg, q, max_new_tokens=4, cache=cache,
                                                                 max_slots=14)], axis=1)
    np.testing.assert_array_equal(streamed, np.asarray(plain.tokens))
    wide = sk.generate(params, cfg, q, max_new_tokens=4, context=ctx)        # 5 + 3 cached of 48 slots
    assert wide.cache.slots == 48
    more = sk.generate(params, cfg, q[:, :2], max_new_tokens=4, context=ctx, cache=wide.cache, max_slots=40)
    assert more.cache.slots == 48
    _, full = sk.extend(params, cfg, None, q, context=ctx, max_slots=5)     # rows on a context: no prefill
    with pytest.raises(ValueError, match=r"KV cache is full: .*; extend with a larger max_slots"):
        sk.decode_step(params, cfg, q[:, 0], full, context=ctx)


def test_a_stream_refuses_rows_on_a_context_and_swapped_params_in_one_line():
    """`stream_generate` has no context=: a cache of rows started on one is refused naming generate (it
    said "pass the same context= again", which the stream cannot take); params and cfg swapped are refused
    as generate refuses them (it was an AttributeError)."""
    from snapkv_jax.decode_blocks import stream_generate
    cfg = CONFIGS["gqa"]
    params = _params(cfg)
    _, ctx = sk.prefill(params, cfg, _tokens(cfg, 1, 12, 0))
    q = _tokens(cfg, 2, 5, 1)
    _, own = sk.extend(params, cfg, None, q, context=ctx)
    for call, message in ((lambda: stream_generate(params, cfg, q, max_new_tokens=3, cache=own),
                           r"^this cache holds rows' own tokens after a shared context.*generate\(\.\.\., cache=, "
                           r"context=\)$"),
                          (lambda: stream_generate(cfg, params, q, max_new_tokens=3), "params and cfg swapped")):
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_a_continuation_past_the_positions_names_the_cached_ones():
    """A turn that alone overflows max_position_embeddings after a cache is refused naming the cached
    positions too (it named the turn alone, "the prompt plus max_new_tokens needs 42 positions"), by
    generate and by a stream (an audit)."""
    from snapkv_jax.decode_blocks import stream_generate
    cfg = sk.ModelConfig.tiny(max_position_embeddings=40)
    params = _params(cfg)
    _, cache = sk.prefill(params, cfg, _tokens(cfg, 1, 5, 0))
    turn = _tokens(cfg, 1, 38, 1)
    for run in (sk.generate, stream_generate):
        with pytest.raises(ValueError, match=r"^the prompt after 5 cached positions plus max_new_tokens=5 needs 47 "
                                             r"positions, more than the model's max_position_embeddings=40$"):
            run(params, cfg, turn, max_new_tokens=5, cache=cache)


# ------------------------------------------------------------------------------------- re-compression
def _rms(x, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def oracle_layer0_queries(params, cfg, tokens, positions):
    """Layer 0's queries `[T, H, D]` (float64, after RoPE) of tokens at positions, from the params alone."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x = _rms(p["embed"]["embedding"][tokens], cfg.rms_norm_eps) * p["layers_0"]["attn_norm"]["scale"]
    q = (x @ p["layers_0"]["attn"]["q_proj"]["kernel"]).reshape(len(tokens), cfg.num_heads, cfg.head_dim)
    d = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
    ang = np.concatenate([np.outer(positions, inv)] * 2, axis=-1)[:, None, :]   # [T, 1, D]
    rot = np.concatenate([-q[..., d // 2:], q[..., :d // 2]], axis=-1)
    return q * np.cos(ang) + rot * np.sin(ang)


def _rope(x, positions, theta):
    d = x.shape[-1]
    ang = np.concatenate([np.outer(positions, 1.0 / theta ** (np.arange(0, d, 2) / d))] * 2, axis=-1)[:, None, :]
    return x * np.cos(ang) + np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1) * np.sin(ang)


def oracle_segment_queries(params, cfg, tokens, qpos, cache, row):
    """(every layer's queries `[T, H, D]` (float64, after RoPE), the last token's logits `[V]`) of a
    segment's tokens at positions `qpos`, the model run in NumPy with each layer attending to `row`'s
    slots of `cache` (a cache holding the segment's own K/V: the plain extend's) up to each token's
    position, within a sliding window."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    heads, d, group = cfg.num_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    x = p["embed"]["embedding"][tokens]                                      # [T, Dm]
    queries = []
    for layer in range(cfg.num_layers):
        a = p[f"layers_{layer}"]
        h = _rms(x, cfg.rms_norm_eps) * a["attn_norm"]["scale"]
        q = _rope((h @ a["attn"]["q_proj"]["kernel"]).reshape(len(tokens), heads, d), qpos, cfg.rope_theta)
        queries.append(q)
        keys, values = (np.asarray(t[layer][row], np.float64) for t in (cache.k, cache.v))   # [K, S, D]
        pos = np.asarray(cache.pos[layer][row])                                            # [K, S]
        out = np.zeros_like(q)
        for i, qp in enumerate(qpos):
            for hh in range(heads):
                seen = (pos[hh // group] >= 0) & (pos[hh // group] <= qp)
                if cfg.sliding_window:
                    seen &= pos[hh // group] > qp - cfg.sliding_window
                logits = keys[hh // group][seen] @ q[i, hh] / math.sqrt(d)
                e = np.exp(logits - logits.max())
                out[i, hh] = (e / e.sum()) @ values[hh // group][seen]
        x = x + out.reshape(len(tokens), -1) @ a["attn"]["o_proj"]["kernel"]
        h = _rms(x, cfg.rms_norm_eps) * a["mlp_norm"]["scale"]
        gate, up = h @ a["mlp"]["gate_proj"]["kernel"], h @ a["mlp"]["up_proj"]["kernel"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ a["mlp"]["down_proj"]["kernel"]
    return queries, (_rms(x[-1], cfg.rms_norm_eps) * p["final_norm"]["scale"]) @ p["lm_head"]["kernel"]


def oracle_scores(q, qpos, keys, pos):
    """[H, S] float64: summed softmax of queries q [n, H, D] at qpos [n] over the slots whose position
    is in 0 .. qpos (keys [K, S, D], pos [K, S])."""
    heads, d = q.shape[1], q.shape[2]
    group = heads // keys.shape[0]
    out = np.zeros((heads, keys.shape[1]))
    for h in range(heads):
        for i in range(len(q)):
            seen = (pos[h // group] >= 0) & (pos[h // group] <= qpos[i])
            logits = keys[h // group][seen] @ q[i, h] / math.sqrt(d)
            e = np.exp(logits - logits.max())
            out[h, seen] += e / e.sum()
    return out


def oracle_live_selection(method, q_seg, qpos, keys, pos, occupied):
    """Per KV head of one row's live layer (slot space, compression/live.py): (the kept positions, and
    for a scored method the prefix slots' scores `[P]` and the window's positions, else None, None)."""
    kv_heads, group = keys.shape[0], q_seg.shape[1] // keys.shape[0]
    if occupied <= method.capacity:
        return [(set(p for p in pos[h, :occupied] if p >= 0), None, None) for h in range(kv_heads)]
    if isinstance(method, sk.StreamingLLM):
        slots = list(range(method.sinks)) + list(range(occupied - (method.capacity - method.sinks), occupied))
        return [(set(pos[h, slots].tolist()), None, None) for h in range(kv_heads)]
    w = method.window
    if isinstance(method, sk.H2O):
        per_head = oracle_scores(q_seg, qpos, keys, pos)
        if method.normalize:
            seen = np.array([[(pos[h // group] >= 0) & (pos[h // group] <= qp) for qp in qpos]
                             for h in range(q_seg.shape[1])]).sum(axis=1)
            per_head = per_head / np.maximum(seen, 1)
        per_head = per_head[:, :occupied - w]
    else:  # SnapKV: the segment's last w tokens, pooled over the prefix slots
        per_head = oracle_scores(q_seg[-w:], qpos[-w:], keys, pos)[:, :occupied - w]
        per_head = np.stack([oracle_pool(s, method.kernel, method.pooling) for s in per_head])
    grouped = per_head.reshape(kv_heads, group, -1)
    scores = grouped.mean(axis=1) if method.gqa_reduce == "mean" else grouped.max(axis=1)
    kept = []
    for h in range(kv_heads):
        order = np.argsort(-scores[h], kind="stable")[:method.capacity - w]
        window = set(pos[h, occupied - w:occupied].tolist())
        kept.append((set(pos[h, order].tolist()) | window, scores[h], window))
    return kept


def assert_kept(got, expected, pos, budget, where):
    """`got` (positions) is the oracle's set or, under near-ties, another valid top-`budget` of its
    prefix-slot scores with the whole window."""
    kept, scores, window = expected
    if got == kept:
        return
    assert scores is not None, f"{where}: kept {sorted(got)}, expected {sorted(kept)}"
    assert window <= got, f"{where}: dropped window positions {sorted(window - got)}"
    slot_of = {int(p): s for s, p in enumerate(pos)}
    assert is_valid_top_k(scores, {slot_of[p] for p in got - window}, budget), (
        f"{where}: kept {sorted(got - kept)} over {sorted(kept - got)}")


@settings(max_examples=6)
@given(st.data())
def test_recompression_keeps_the_oracles_slots(data):
    cfg = CONFIGS[data.draw(st.sampled_from(sorted(CONFIGS)))]
    window = data.draw(st.integers(1, 6))
    capacity = window + data.draw(st.integers(2, 12))
    method = data.draw(st.sampled_from([
        sk.SnapKV(window=window, capacity=capacity, kernel=data.draw(st.sampled_from([1, 3, 5])),
                        pooling=data.draw(st.sampled_from(["maxpool", "avgpool", "none"])),
                        gqa_reduce=data.draw(st.sampled_from(["mean", "max"]))),
        sk.H2O(capacity=capacity, window=window, normalize=data.draw(st.booleans())),
        sk.StreamingLLM(capacity=capacity, sinks=min(window, 3)),
    ]))
    prompt = data.draw(st.lists(st.integers(1, 24), min_size=1, max_size=2))
    seg = [data.draw(st.integers(1, 10)) for _ in prompt]
    params = _params(cfg)
    seed = data.draw(st.integers(0, 1000))
    a, b = _tokens(cfg, len(prompt), 24, seed), _tokens(cfg, len(prompt), 10, seed + 1)
    _, cache = sk.prefill(params, cfg, a, prompt, compress=data.draw(st.sampled_from([None, method])))
    plain_logits, plain = sk.extend(params, cfg, cache, b, seg)
    _, squeezed = sk.extend(params, cfg, cache, b, seg, compress=method)
    writes = kv.host_write_slots(cache)
    for r, n in enumerate(seg):
        start = int(cache.next_pos[r])
        qpos = np.arange(start, start + n)
        queries, logits = oracle_segment_queries(params, cfg, b[r, :n], qpos, plain, r)
        np.testing.assert_allclose(queries[0], oracle_layer0_queries(params, cfg, b[r, :n], qpos), atol=1e-12)
        np.testing.assert_allclose(logits, plain_logits[r], atol=1e-4)        # the oracle's forward is the model's
        for layer, q in enumerate(queries):
            keys, pos = np.asarray(plain.k[layer][r], np.float64), np.asarray(plain.pos[layer][r])
            expected = oracle_live_selection(method, q, qpos, keys, pos, int(writes[layer, r]) + n)
            got = np.asarray(squeezed.pos[layer][r])
            for h in range(cfg.num_kv_heads):
                live = got[h][got[h] >= 0]
                assert (np.diff(live) > 0).all(), f"row {r} layer {layer} head {h}: not in position order: {live}"
                assert_kept(set(live.tolist()), expected[h], pos[h], method.capacity - getattr(method, "window", 0),
                            f"{method.describe()} row {r} layer {layer} head {h}")
        # every kept slot holds the K/V the plain extend computed for that position
        for layer in range(cfg.num_layers):
            ref = _live(plain, layer, r)
            for h, head in enumerate(_live(squeezed, layer, r)):
                for p, (k, v) in head.items():
                    np.testing.assert_allclose(k, ref[h][p][0], atol=1e-6)
                    np.testing.assert_allclose(v, ref[h][p][1], atol=1e-6)


@pytest.mark.parametrize("method", [m for m in METHODS.values() if m is not None],
                         ids=[k for k, m in METHODS.items() if m is not None])
def test_recompressed_rows_hold_capacity_and_the_window_and_continue_decoding(method):
    cfg = CONFIGS["gqa"]
    params = _params(cfg)
    _, cache = sk.prefill(params, cfg, _tokens(cfg, 3, 30, 0), PROMPT_LENGTHS, compress=method)
    seg = np.array([6, 2, 9], np.int32)
    logits, out = sk.extend(params, cfg, cache, _tokens(cfg, 3, 9, 1), seg, compress=method)
    plain_logits, plain = sk.extend(params, cfg, cache, _tokens(cfg, 3, 9, 1), seg)
    np.testing.assert_allclose(logits, plain_logits, atol=1e-6)   # a layer is compressed after it attends
    writes = kv.host_write_slots(plain)
    for layer in range(cfg.num_layers):
        threshold = method.threshold(layer, cfg.num_layers)
        held = np.asarray(kv.valid_slots(out))[layer]                         # [B, K]
        for r in range(3):
            total = int(writes[layer, r])
            last = set(range(int(plain.next_pos[r]) - getattr(method, "window", 0), int(plain.next_pos[r])))
            if total <= threshold:                                            # untouched
                np.testing.assert_array_equal(np.asarray(out.pos[layer][r])[:, :total],
                                              np.asarray(plain.pos[layer][r])[:, :total])
                continue
            per_head = held[r].sum() if isinstance(method, sk.AdaKV) else held[r]
            expected = cfg.num_kv_heads * method.capacity if isinstance(method, sk.AdaKV) else method.slots(
                layer, cfg.num_layers)
            assert np.all(per_head == expected), f"layer {layer} row {r}: {held[r]}"
            for h in range(cfg.num_kv_heads):
                assert last <= set(np.asarray(out.pos[layer][r, h]).tolist()), f"layer {layer} row {r}"
    assert int(np.min(free_slots(out))) >= 1
    step_logits, _ = sk.decode_step(params, cfg, np.argmax(logits, -1), out)
    assert np.isfinite(np.asarray(step_logits)).all()


def test_adakv_recompression_of_a_cache_cut_by_a_smaller_budget_keeps_each_position_once():
    """Re-compressing with a larger Ada-KV floor than the prompt's cut left some heads (alpha=0 then 0.9):
    every head still holds each position at most once, so no key is attended twice."""
    cfg = CONFIGS["gqa"]
    params = sk.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    _, cache = sk.prefill(params, cfg, rng.integers(0, cfg.vocab_size, (1, 24)).astype(np.int32),
                          compress=sk.AdaKV(capacity=6, window=1, alpha=0.0, max_per_head=10), max_slots=40)
    _, out = sk.extend(params, cfg, cache, rng.integers(0, cfg.vocab_size, (1, 1)).astype(np.int32),
                       compress=sk.AdaKV(capacity=9, window=1, alpha=0.9))
    for layer in range(cfg.num_layers):
        for h in range(cfg.num_kv_heads):
            before = {int(p) for p in np.asarray(cache.pos[layer][0, h]) if p >= 0}
            held = [int(p) for p in np.asarray(out.pos[layer][0, h]) if p >= 0]
            assert len(held) == len(set(held)), f"layer {layer} head {h}: {held}"
            assert set(held) == before | {24}, f"layer {layer} head {h}: {held}"   # too few to drop any


# --------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_in_one_line_and_leaves_the_cache_usable():
    cfg = CONFIGS["gqa"]
    params = _params(cfg)
    _, cache = sk.prefill(params, cfg, _tokens(cfg, 2, 20, 0), [20, 5])
    seg = _tokens(cfg, 2, 4, 1)
    other = sk.ModelConfig.tiny(num_layers=3)
    _, foreign = sk.prefill(sk.init_params(other, jax.random.key(0)), other, _tokens(cfg, 2, 20, 0))
    short = sk.ModelConfig.tiny(max_position_embeddings=22)
    cases = [
        (dict(cache=foreign), "built for another model"),
        (dict(tokens=seg[:1]), "1 rows but the cache has batch 2"),
        (dict(cfg=short), "max_position_embeddings=22"),
        (dict(max_slots=21), "more than max_slots=21"),
        (dict(context=cache), "context must be the cache of one context"),
        (dict(compress=sk.SnapKV(window=2, capacity=8), context=kv.take_rows(cache, [0])),
         "compress= with context= is not supported"),
        (dict(cache=None), "cache=None needs context="),
        (dict(cache="not a cache"), "must be a snapkv_jax.KVCache"),
        (dict(tokens=np.full((2, 4), cfg.vocab_size)), "outside the vocabulary"),
        (dict(max_slots=-1), "max_slots must be a positive integer, got -1"),
        (dict(compress=sk.SnapKV(window=2, capacity=30), max_slots=25),
         "compress=SnapKV keeps up to 30 slots in a layer, more than max_slots=25"),
        (dict(cache=cache.replace(pos=(cache.pos[0], cache.pos[1][:, :, :-1]) + cache.pos[2:])),
         r"cache layer 1: k \(2, 2, 20, 16\) float32, v .* pos \(2, 2, 19\) do not agree"),
        (dict(cache=cache.replace(next_pos=cache.next_pos[:1])), r"cache.next_pos has shape \(1,\), want \(2,\)"),
    ]
    before = jax.tree_util.tree_map(np.asarray, cache)
    for overrides, message in cases:
        args = dict(cfg=cfg, cache=cache, tokens=seg) | overrides
        rest = {k: v for k, v in args.items() if k not in ("cfg", "cache", "tokens")}
        with pytest.raises(ValueError, match=message) as err:
            sk.extend(params, args["cfg"], args["cache"], args["tokens"], **rest)
        assert "\n" not in str(err.value)
    after = jax.tree_util.tree_map(np.asarray, cache)
    for x, y in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(x, y)


def test_a_continuation_refuses_kernel_choices_it_would_ignore():
    """`generate(cache=...)` / `generate(context=...)` run extend's kernels; they used to accept and
    ignore `implementation=` and `snap_impl=`, even values a fresh call refuses (an audit)."""
    cfg = sk.ModelConfig.tiny()
    params = sk.init_params(cfg, jax.random.key(0))
    _, cache = sk.prefill(params, cfg, _tokens(cfg, 1, 12, 0), max_slots=40)
    for kwargs, message in ((dict(implementation="bogus"), "unknown attention implementation 'bogus'"),
                            (dict(snap_impl="bogus"), "bogus"),
                            (dict(implementation="xla"), "a continuation \\(cache= or context=\\) runs extend's"),
                            (dict(snap_impl="xla"), "leave both at their defaults")):
        for where in (dict(cache=cache), dict(context=cache)):
            with pytest.raises(ValueError, match=message) as err:
                sk.generate(params, cfg, _tokens(cfg, 1, 3, 1), max_new_tokens=2, **where, **kwargs)
            assert "\n" not in str(err.value)


def test_misuse_from_a_notebook_is_refused_in_one_line():
    """What a notebook gets wrong: calling inside jax.jit (any traced input), cfg not a ModelConfig or
    swapped with params, a cache donated to an earlier step, a rows' own cache passed as a context, a
    bad decode_compress. Each is a one-line ValueError naming it, not an error from inside NumPy or jax."""
    cfg = CONFIGS["gqa"]
    params = _params(cfg)
    tokens = _tokens(cfg, 2, 20, 0)
    _, cache = sk.prefill(params, cfg, tokens, max_slots=24)
    _, ctx = sk.prefill(params, cfg, tokens[:1])
    _, own = sk.extend(params, cfg, None, tokens[:1, :4], context=ctx)
    _, stepped = sk.decode_step(params, cfg, np.array([1, 2]), cache, donate=True)
    # the layers' arrays are handed over (jax 0.11's CPU client keeps the few [B] vectors, 0.10's does not)
    assert all(x.is_deleted() for x in (*cache.k, *cache.v, *cache.pos)), "decode_step(donate=True) donated"
    traced = lambda f, x: jax.jit(f)(x)                          # noqa: E731
    cases = [
        (lambda: traced(lambda t: sk.generate(params, cfg, t, max_new_tokens=2).tokens, tokens), "tokens is a traced"),
        (lambda: traced(lambda n: sk.prefill(params, cfg, tokens, n)[0], np.array([20, 9])), "lengths is a traced"),
        (lambda: traced(lambda p: sk.prefill(p, cfg, tokens)[0], params), "params is a traced"),
        (lambda: traced(lambda c: sk.extend(params, cfg, c, tokens[:, :3])[0], stepped), "cache is a traced"),
        (lambda: traced(lambda t: sk.decode_step(params, cfg, t, stepped)[0], np.array([1, 2])),
         "next_tokens is a traced"),
        (lambda: sk.generate(params, dict(vocab_size=cfg.vocab_size), tokens, max_new_tokens=2),
         "cfg must be a snapkv_jax.ModelConfig .* got dict$"),
        (lambda: sk.prefill(cfg, params, tokens), "got dict; params and cfg swapped"),
        (lambda: sk.decode_step(params, cfg, np.array([1, 2]), cache), "cache was donated to an earlier call"),
        (lambda: sk.extend(params, cfg, cache, tokens[:, :3]), "cache was donated to an earlier call"),
        (lambda: sk.generate(params, cfg, tokens, cache=cache, max_new_tokens=2), "cache was donated"),
        (lambda: sk.extend(params, cfg, None, tokens[:, :3], context=own), "context holds rows' own tokens"),
        (lambda: sk.generate(params, cfg, tokens[:, :3], context=own, max_new_tokens=2),
         "context holds rows' own tokens"),
        (lambda: sk.generate(params, cfg, np.repeat(tokens[:1, :3], 3, 0), context=stepped, max_new_tokens=2),
         "context must be the cache of one context"),
        (lambda: sk.generate(params, cfg, tokens, max_new_tokens=2, decode_compress="snapkv"),
         "decode_compress must be None or a compression method"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    sk.decode_step(params, cfg, np.array([1, 2]), stepped)      # the returned cache is the live one


def test_growth_past_the_free_memory_is_refused_before_it_runs(monkeypatch):
    """A continuation whose grown cache cannot fit is refused naming the tokens asked for (prefill checks
    its own peak the same way); the same call within the budget runs."""
    cfg = sk.ModelConfig.tiny(max_position_embeddings=1 << 20)
    params = _params(cfg)
    _, cache = sk.prefill(params, cfg, _tokens(cfg, 2, 20, 0))
    monkeypatch.setenv("SNAPKV_JAX_MEMORY_BUDGET", "1MiB")    # a slot of both layers and rows: 1 KiB
    seg = _tokens(cfg, 2, 4, 1)
    with pytest.raises(ValueError, match=r"the grown cache needs .* for 4 new tokens \+ 4096 to generate") as err:
        sk.generate(params, cfg, seg, cache=cache, max_new_tokens=4096)
    assert "\n" not in str(err.value) and "1.00 MiB are free" in str(err.value)
    with pytest.raises(ValueError, match="for 2000 new tokens, batch 2"):
        sk.extend(params, cfg, cache, _tokens(cfg, 2, 2000, 2))
    sk.generate(params, cfg, seg, cache=cache, max_new_tokens=64)


def test_continuing_a_cache_fetches_its_state_once_and_checks_the_tokens_to_come(monkeypatch):
    """`generate(cache=)` and `stream_generate(cache=)` read the cache's positions and next slots back in
    one transfer (extend's), and refuse, before anything runs, a continuation whose max_new_tokens would
    pass max_position_embeddings."""
    from snapkv_jax import decode_blocks
    cfg = sk.ModelConfig.tiny(max_position_embeddings=40)
    params = _params(cfg)
    _, cache = sk.prefill(params, cfg, _tokens(cfg, 2, 20, 0), [20, 5])
    seg = _tokens(cfg, 2, 4, 1)
    sk.generate(params, cfg, seg, max_new_tokens=2, cache=cache)                 # compiled
    fetches = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: fetches.append(x) or real(x))
    sk.generate(params, cfg, seg, max_new_tokens=2, cache=cache)
    assert len(fetches) == 1
    for run in (sk.generate, decode_blocks.stream_generate):
        with pytest.raises(ValueError, match=r"needs 41 positions.*max_position_embeddings=40") as err:
            run(params, cfg, seg, max_new_tokens=18, cache=cache)
        assert "max_new_tokens=18" in str(err.value) and "\n" not in str(err.value)


def test_continuations_never_hand_the_callers_arrays_to_a_donating_loop(monkeypatch):
    """On a GPU generate's decode loop and stream_generate's blocks donate their cache, which deletes every
    array the caller shares with it (on an H200 a second `generate(cache=c)` raised "Array has been
    deleted": extend passes `lengths` through). The cache each hands over shares no buffer with a cache
    the caller holds at that call, so one state can be continued twice and a context asked again, with the
    same tokens. The CPU does not donate (generate._decode_loop_program): this checks the buffers."""
    import sys
    from snapkv_jax import decode_blocks
    gen = sys.modules["snapkv_jax.generate"]
    cfg = CONFIGS["gqa"]
    params = _params(cfg)
    _, cache = sk.prefill(params, cfg, _tokens(cfg, 2, 20, 0))
    _, ctx = sk.prefill(params, cfg, _tokens(cfg, 1, 20, 2))
    seg = _tokens(cfg, 2, 4, 1)
    held, shared = [], []

    def pointers(*trees):
        return {x.unsafe_buffer_pointer() for t in trees for x in jax.tree.leaves(t)}

    def spy(program, index):  # at hand-over: the buffers of the caches the caller holds, and shared ones
        real = program()

        def call(*args, **kw):
            own = args[index].cache if isinstance(args[index], decode_blocks.Decoding) else args[index]
            shared.append(pointers(own) & pointers(*held))
            return real(*args, **kw)
        return lambda: call
    monkeypatch.setattr(gen, "_decode_loop_program", spy(gen._decode_loop_program, 2))
    monkeypatch.setattr(decode_blocks, "_block_program", spy(decode_blocks._block_program, 1))

    def intact(*caches):
        return not any(x.is_deleted() for c in caches for x in jax.tree.leaves(c))
    held[:] = [cache]
    runs = [sk.generate(params, cfg, seg, max_new_tokens=3, cache=cache) for _ in range(2)]
    held[:] = [ctx]
    first = sk.generate(params, cfg, seg, max_new_tokens=3, context=ctx)
    held[:] = [ctx, first.cache]
    again = [sk.generate(params, cfg, seg, max_new_tokens=3, context=ctx, cache=first.cache) for _ in range(2)]
    held[:] = [cache]
    streamed = [np.concatenate([new for new, _ in decode_blocks.stream_generate(
        params, cfg, seg, max_new_tokens=3, cache=cache, block=1)], axis=1) for _ in range(2)]
    assert len(shared) == 9 and not any(shared)               # five decode loops, four blocks
    assert intact(cache, ctx, first.cache)
    for a, b in (runs, again):
        np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(streamed[0], streamed[1])
    np.testing.assert_array_equal(streamed[0], np.asarray(runs[0].tokens))


def test_segments_of_one_width_bucket_compile_nothing_new():
    """Segments whose widths share a bucket reuse extend's compiled programs (the layers', the first
    group's with the embedding among them; the LM head), onto a cache and for rows started on a shared
    context."""
    from tests.compile_log import lowered
    cfg = CONFIGS["gqa"]
    params = _params(cfg)
    _, cache = sk.prefill(params, cfg, _tokens(cfg, 2, 9, 0), max_slots=64)
    _, ctx = sk.prefill(params, cfg, _tokens(cfg, 1, 12, 1))
    sk.extend(params, cfg, cache, _tokens(cfg, 2, 3, 2))
    sk.extend(params, cfg, None, _tokens(cfg, 2, 3, 3), context=ctx)
    with lowered("_layers", "_head", "_after") as counts:
        for width in (5, 11):                                                    # bucket 32, like 3
            sk.extend(params, cfg, cache, _tokens(cfg, 2, width, width))
            sk.extend(params, cfg, None, _tokens(cfg, 2, width, width), context=ctx)
    assert counts == {}


def test_host_inputs_reach_the_device_in_one_transfer_unchanged(monkeypatch):
    """extend's host arrays (tokens, lengths, write slots, context marks: int32 and uint32 of any shape,
    strided too) go over as one int32 vector and come back from it bit for bit, in shape and dtype; an
    extend of an existing cache makes one `device_put` of one array."""
    from snapkv_jax.generate import segment
    rng = np.random.default_rng(0)
    arrays = dict(tokens=rng.integers(-2**31, 2**31 - 1, (2, 5)).astype(np.int32),
                  marks=rng.integers(0, 2**32 - 1, 2, dtype=np.uint64).astype(np.uint32),
                  strided=rng.integers(-9, 9, (2, 3)).astype(np.int32).T, scalar=np.array(-7, np.int32),
                  empty=np.zeros((2, 0), np.int32))
    flat, layout = segment.pack(arrays)
    assert flat.dtype == np.int32 and flat.shape == (sum(a.size for a in arrays.values()),)
    back = jax.jit(segment.unpack, static_argnums=1)(jnp.asarray(flat), layout)
    assert sorted(back) == sorted(arrays)
    for name, want in arrays.items():
        got = back[name]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got).reshape(-1).view(np.uint8),
                                      np.ascontiguousarray(want).reshape(-1).view(np.uint8))
    cfg = CONFIGS["gqa"]
    params = sk.init_params(cfg, jax.random.key(0))
    _, cache = sk.prefill(params, cfg, _tokens(cfg, 2, 9, 0))
    puts = []
    real_put = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda x, *a, **k: puts.append(len(jax.tree.leaves(x))) or real_put(x, *a, **k))
    sk.extend(params, cfg, cache, _tokens(cfg, 2, 3, 1), np.array([3, 1]))
    assert puts == [1]
