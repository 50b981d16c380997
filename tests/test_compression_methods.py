"""Every compression method's selection (`snapkv_jax.compression.select`) against a plain float64 oracle.

Each oracle loops over one row, one head and one query at a time in NumPy float64, sharing no code with
the implementation (the SnapKV scoring oracle comes from tests/test_snapkv_select.py). Inputs are
hypothesis-drawn: GQA groups 1-8, ragged lengths, lengths exactly at the capacity and one above it. Where
max pooling or the data make ties, a differing kept set is accepted only as another valid top-k.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import snapkv_jax as sk
from snapkv_jax.compression import select
from tests.test_snapkv_select import TIE_TOL, is_valid_top_k, oracle_scores

HEAD_DIM = 16


# ------------------------------------------------------------------------------------------ strategies
@st.composite
def prompts(draw, capacity, max_kv_heads=2):
    """(q [B, H, T, D], k [B, K, T, D], lengths [B]) with lengths around `capacity`."""
    group = draw(st.integers(1, 8))
    kv_heads = draw(st.integers(1, max_kv_heads))
    tokens = capacity + draw(st.integers(1, 30))
    length = st.one_of(st.just(capacity), st.just(capacity + 1), st.just(tokens), st.integers(1, tokens))
    lengths = draw(st.lists(length, min_size=1, max_size=3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = (2 * rng.standard_normal((len(lengths), group * kv_heads, tokens, HEAD_DIM))).astype(np.float32)
    k = rng.standard_normal((len(lengths), kv_heads, tokens, HEAD_DIM)).astype(np.float32)
    return q, k, np.asarray(lengths, np.int32)


def run(method, q, k, lengths, layer=0, num_layers=1):
    return np.array(select(method, jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths), layer=layer,
                           num_layers=num_layers, impl="xla"))


def assert_untouched(kept, length):
    """A row no method compresses: slot i holds position i, then -1."""
    width = kept.shape[-1]
    expected = np.where(np.arange(width) < length, np.arange(width), -1)
    np.testing.assert_array_equal(kept, np.broadcast_to(expected, kept.shape))


def live(row):
    """The kept positions of one (row, KV head), checked ascending with the -1 holes last."""
    n = int((row >= 0).sum())
    assert (row[n:] == -1).all(), f"holes not last: {row}"
    assert (np.diff(row[:n]) > 0).all(), f"not ascending and unique: {row}"
    return row[:n]


def assert_prefix_is_top(scores, kept, length, window, budget, where):
    """`kept` holds the window and a valid top-`budget` of the prefix under `scores [P]`."""
    kept = set(kept.tolist())
    win = set(range(length - window, length))
    assert win <= kept, f"{where}: dropped window positions {sorted(win - kept)}"
    prefix = kept - win
    ref = set(np.argsort(-scores, kind="stable")[:budget].tolist())
    if prefix != ref:
        assert is_valid_top_k(scores, prefix, budget), (
            f"{where}: kept {sorted(prefix - ref)} over {sorted(ref - prefix)}")


def window_q(q_row, length, window):
    """`[H, w, D]` queries of positions L-w .. L-1 of one row."""
    return q_row[:, length - window:length]


# ---------------------------------------------------------------------------------------- StreamingLLM
@settings(max_examples=25)
@given(st.data())
def test_streamingllm_keeps_sinks_and_the_most_recent(data):
    sinks = data.draw(st.integers(0, 6))
    method = sk.StreamingLLM(capacity=sinks + data.draw(st.integers(1, 20)), sinks=sinks)
    q, k, lengths = data.draw(prompts(method.capacity))
    idx = run(method, q, k, lengths)
    assert idx.shape == (len(lengths), k.shape[1], method.capacity)
    for b, length in enumerate(lengths):
        if length <= method.capacity:
            assert_untouched(idx[b], length)
            continue
        expected = list(range(sinks)) + list(range(length - (method.capacity - sinks), length))
        for head in range(k.shape[1]):
            assert live(idx[b, head]).tolist() == expected


# ------------------------------------------------------------------------------------------------- H2O
def oracle_h2o_scores(q, k, length, method):
    """One row: q `[H, T, D]`, k `[K, T, D]` -> `[K, L]` float64 H2O scores, GQA-reduced."""
    heads, d = q.shape[0], q.shape[2]
    group = heads // k.shape[0]
    per_head = np.zeros((heads, length))
    for h in range(heads):
        for i in range(length):          # query i sees keys 0 .. i
            logits = k[h // group, :i + 1] @ q[h, i] / math.sqrt(d)
            p = np.exp(logits - logits.max())
            per_head[h, :i + 1] += p / p.sum()
    if method.normalize:
        per_head /= length - np.arange(length)          # key j is seen by queries j .. L-1
    grouped = per_head.reshape(k.shape[0], group, length)
    return grouped.mean(axis=1) if method.gqa_reduce == "mean" else grouped.max(axis=1)


@settings(max_examples=25)
@given(st.data())
def test_h2o_matches_oracle(data):
    window = data.draw(st.integers(0, 8))
    method = sk.H2O(capacity=window + data.draw(st.integers(1, 16)), window=window,
                    normalize=data.draw(st.booleans()), gqa_reduce=data.draw(st.sampled_from(["mean", "max"])))
    q, k, lengths = data.draw(prompts(method.capacity))
    idx = run(method, q, k, lengths)
    assert idx.shape == (len(lengths), k.shape[1], method.capacity)
    for b, length in enumerate(lengths):
        if length <= method.capacity:
            assert_untouched(idx[b], length)
            continue
        scores = oracle_h2o_scores(q[b].astype(np.float64), k[b].astype(np.float64), length, method)
        for head in range(k.shape[1]):
            assert_prefix_is_top(scores[head, :length - window], live(idx[b, head]), length, window,
                                 method.capacity - window, f"row {b} head {head}")


def test_h2o_differs_from_its_normalized_variant():
    """The oracle test would pass for either variant if `normalize` were ignored; this would not."""
    rng = np.random.default_rng(3)
    q = (2 * rng.standard_normal((1, 2, 64, HEAD_DIM))).astype(np.float32)
    k = rng.standard_normal((1, 1, 64, HEAD_DIM)).astype(np.float32)
    lengths = np.array([64], np.int32)
    plain = run(sk.H2O(capacity=24, window=4), q, k, lengths)
    normalized = run(sk.H2O(capacity=24, window=4, normalize=True), q, k, lengths)
    assert not np.array_equal(plain, normalized)


# -------------------------------------------------------------------------------------------- RandomKV
@settings(max_examples=20)
@given(st.data())
def test_random_keeps_window_and_the_right_count(data):
    window = data.draw(st.integers(0, 8))
    method = sk.RandomKV(capacity=window + data.draw(st.integers(1, 16)), window=window,
                         seed=data.draw(st.integers(0, 2**32 - 1)))
    q, k, lengths = data.draw(prompts(method.capacity))
    layer = data.draw(st.integers(0, 3))
    idx = run(method, q, k, lengths, layer=layer, num_layers=4)
    for b, length in enumerate(lengths):
        if length <= method.capacity:
            assert_untouched(idx[b], length)
            continue
        for head in range(k.shape[1]):
            kept = live(idx[b, head])
            assert len(kept) == method.capacity and kept.max() < length
            assert set(range(length - window, length)) <= set(kept.tolist())


def test_random_choice_is_seeded_and_ignores_the_data():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 2, 80, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((2, 2, 80, HEAD_DIM)).astype(np.float32)
    lengths = np.array([80, 80], np.int32)
    a = run(sk.RandomKV(capacity=20, window=4, seed=1), q, k, lengths)
    np.testing.assert_array_equal(a, run(sk.RandomKV(capacity=20, window=4, seed=1), -q, 3 * k, lengths))
    assert not np.array_equal(a, run(sk.RandomKV(capacity=20, window=4, seed=2), q, k, lengths))
    assert not np.array_equal(a[0, 0], a[0, 1])                    # KV heads choose independently
    assert not np.array_equal(a, run(sk.RandomKV(capacity=20, window=4, seed=1), q, k, lengths, layer=1,
                                     num_layers=2))                # and so do layers


def test_random_choice_is_uniform_over_the_prefix():
    """Over 400 draws (4 seeds x 100 KV heads, each hashed apart), every prefix position is kept about
    (C - w) / P of the time (chi-square)."""
    prefix, budget, heads = 40, 10, 100
    q = np.zeros((1, heads, prefix + 4, HEAD_DIM), np.float32)
    counts = np.zeros(prefix)
    for seed in range(4):
        kept = run(sk.RandomKV(capacity=budget + 4, window=4, seed=seed), q, q, np.array([prefix + 4]))[0]
        np.add.at(counts, kept[kept < prefix], 1)
    expected = 4 * heads * budget / prefix
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert counts.sum() == 4 * heads * budget
    assert chi2 < 80, f"chi-square {chi2:.1f} on 39 degrees of freedom (p < 1e-4 above 80): {counts}"


# ------------------------------------------------------------------------------------------- PyramidKV
def pyramid_prefix_budgets(capacity, window, beta, num_layers):
    """The KVCache-Factory schedule (arXiv 2406.02069), written out layer by layer."""
    p = capacity - window
    if num_layers == 1:
        return [p]
    min_p = p // beta
    max_p = 2 * p - min_p
    step = (max_p - min_p) // (num_layers - 1)
    return [max_p - layer * step for layer in range(num_layers)]


def test_pyramid_schedule_matches_the_papers_example_shape():
    """32 layers, C = 2048 + 32, beta 20: 4045 .. 103 prefix slots, the mean close to 2048."""
    method = sk.PyramidKV(capacity=2080, window=32, beta=20)
    budgets = [method.slots(layer, 32) - 32 for layer in range(32)]
    assert budgets == pyramid_prefix_budgets(2080, 32, 20, 32)
    assert budgets[0] == 2 * 2048 - 2048 // 20 and budgets[-1] == budgets[0] - 31 * ((budgets[0] - 102) // 31)
    assert abs(np.mean(budgets) - 2048) < 0.01 * 2048


@settings(max_examples=25)
@given(st.data())
def test_pyramidkv_matches_oracle(data):
    window = data.draw(st.integers(1, 8))
    num_layers = data.draw(st.integers(1, 5))
    beta = data.draw(st.integers(1, 20))
    p = data.draw(st.integers(num_layers, 16))
    method = sk.PyramidKV(capacity=window + p, window=window, beta=beta,
                          kernel=data.draw(st.sampled_from([1, 3, 5])),
                          pooling=data.draw(st.sampled_from(["maxpool", "avgpool", "none"])),
                          gqa_reduce=data.draw(st.sampled_from(["mean", "max"])))
    budgets = pyramid_prefix_budgets(method.capacity, window, beta, num_layers)
    if budgets[-1] < 1:
        with pytest.raises(ValueError, match="leaves the top layer"):
            method.check_model(num_layers)
        return
    layer = data.draw(st.integers(0, num_layers - 1))
    budget = budgets[layer]
    q, k, lengths = data.draw(prompts(budget + window))
    idx = run(method, q, k, lengths, layer=layer, num_layers=num_layers)
    assert idx.shape == (len(lengths), k.shape[1], budget + window)
    for b, length in enumerate(lengths):
        if length <= budget + window:
            assert_untouched(idx[b], length)
            continue
        scores = oracle_scores(window_q(q[b], length, window).astype(np.float64), k[b].astype(np.float64),
                               length, method)
        for head in range(k.shape[1]):
            assert_prefix_is_top(scores[head], live(idx[b, head]), length, window, budget,
                                 f"layer {layer} row {b} head {head}")


# ----------------------------------------------------------------------------------------------- AdaKV
def oracle_adakv(scores, method):
    """`[K, P]` float64 scores -> per-head kept prefix sets: each head's top floor(alpha p), then the
    K (p - floor) best remaining (head, position) pairs, greedily, skipping heads at the cap."""
    kv_heads = scores.shape[0]
    p, floor, cap = method.prefix_budget, method.floor, method.cap
    kept = [set(np.argsort(-scores[h], kind="stable")[:floor].tolist()) for h in range(kv_heads)]
    pairs = sorted(((scores[h, j], h, j) for h in range(kv_heads) for j in range(scores.shape[1])
                    if j not in kept[h]), key=lambda x: -x[0])
    left = kv_heads * (p - floor)
    for _, h, j in pairs:
        if left == 0:
            break
        if len(kept[h]) < cap:
            kept[h].add(j)
            left -= 1
    return kept


def assert_valid_adakv(scores, kept, method, where):
    """Tie-tolerant: each head holds a valid top-floor safeguard and floor .. cap positions, the layer holds
    K p positions, and their total score equals the oracle's (greedy is optimal for capped top-k)."""
    expected = oracle_adakv(scores, method)
    if kept == expected:
        return
    scale = max(scores.max(), 1e-30)
    assert sum(map(len, kept)) == scores.shape[0] * method.prefix_budget, where
    for h, head_kept in enumerate(kept):
        assert method.floor <= len(head_kept) <= method.cap, f"{where} head {h}: {len(head_kept)} positions"
        if method.floor:
            ranked = np.sort(scores[h, sorted(head_kept)])[::-1]
            dropped = np.setdiff1d(np.arange(scores.shape[1]), sorted(head_kept))
            if dropped.size:
                assert ranked[method.floor - 1] >= scores[h, dropped].max() - TIE_TOL * scale, (
                    f"{where} head {h}: safeguard is not the head's top {method.floor}")
    total = sum(scores[h, sorted(s)].sum() for h, s in enumerate(kept))
    best = sum(scores[h, sorted(s)].sum() for h, s in enumerate(expected))
    assert total >= best - TIE_TOL * scale * len(kept), f"{where}: kept score {total} below oracle's {best}"


@settings(max_examples=30)
@given(st.data())
def test_adakv_matches_oracle(data):
    window = data.draw(st.integers(1, 8))
    p = data.draw(st.integers(1, 16))
    method = sk.AdaKV(capacity=window + p, window=window, alpha=data.draw(st.sampled_from([0.0, 0.2, 0.5, 1.0])),
                      max_per_head=data.draw(st.one_of(st.none(), st.integers(p, 3 * p))),
                      kernel=data.draw(st.sampled_from([1, 3, 5])),
                      pooling=data.draw(st.sampled_from(["maxpool", "avgpool", "none"])),
                      gqa_reduce=data.draw(st.sampled_from(["mean", "max"])))
    q, k, lengths = data.draw(prompts(method.capacity, max_kv_heads=4))
    idx = run(method, q, k, lengths)
    assert idx.shape == (len(lengths), k.shape[1], method.cap + window)
    for b, length in enumerate(lengths):
        if length <= method.capacity:
            assert_untouched(idx[b], length)
            continue
        scores = oracle_scores(window_q(q[b], length, window).astype(np.float64), k[b].astype(np.float64),
                               length, method)
        win = set(range(length - window, length))
        kept = []
        for head in range(k.shape[1]):
            head_kept = set(live(idx[b, head]).tolist())
            assert win <= head_kept, f"row {b} head {head} dropped window positions"
            kept.append(head_kept - win)
        assert_valid_adakv(scores, kept, method, f"row {b}")


def test_adakv_moves_slots_to_the_head_that_needs_them():
    """One KV head attends to a single key, the other evenly: the spread head gets more than p slots."""
    rng = np.random.default_rng(1)
    t, window = 64, 4
    k = rng.standard_normal((1, 2, t, HEAD_DIM)).astype(np.float32)
    q = np.zeros((1, 2, t, HEAD_DIM), np.float32)
    q[0, 0] = 40 * k[0, 0, 10] / np.linalg.norm(k[0, 0, 10])          # head 0: everything on key 10
    idx = run(sk.AdaKV(capacity=20, window=window, alpha=0.2, kernel=1, pooling="none"), q, k, np.array([t]))
    counts = (idx[0] >= 0).sum(axis=1) - window
    assert counts.sum() == 2 * 16 and counts[1] > 16 > counts[0] >= int(0.2 * 16)
    # A cap binds: the spread head stops at max_per_head, the rest goes back to the peaked head.
    capped = run(sk.AdaKV(capacity=20, window=window, alpha=0.2, max_per_head=18, kernel=1, pooling="none"),
                 q, k, np.array([t]))
    assert capped.shape[-1] == 18 + window
    assert ((capped[0] >= 0).sum(axis=1) - window).tolist() == [14, 18]
    assert set(range(t - window, t)) <= set(capped[0, 1].tolist())


def test_equal_scores_go_to_the_earlier_position():
    """The documented tie rule (`base.top_prefix`): of equal scores the earliest positions are kept, as max
    pooling makes plateaus of equal scores."""
    from snapkv_jax.compression.base import top_prefix
    scores = jnp.asarray(np.array([[[1.0, 2.0, 2.0, 0.5, 2.0, 2.0, -np.inf]]], np.float32))
    assert np.asarray(top_prefix(scores, 3)).tolist() == [[[1, 2, 4]]]
    assert np.asarray(top_prefix(scores, 7)).tolist() == [[[1, 2, 4, 5, 0, 3, -1]]]


def test_adakv_safeguard_on_a_sparse_live_layer_keeps_each_slot_once():
    """A live layer (extend / decode-time re-selection) may hold fewer valid prefix slots in a head than
    the safeguard's floor (the cache was cut by a smaller budget before): the safeguard's -1 ranks must not
    knock its real picks back into the joint top-k, which would keep a slot twice (its K/V then counts
    twice in attention)."""
    from snapkv_jax.compression import live as live_select
    method = sk.AdaKV(capacity=5, window=1, alpha=0.5, kernel=1, pooling="none")   # p = 4, floor 2
    kv_heads, slots = 2, 7
    pos = np.tile(np.arange(slots, dtype=np.int32), (1, kv_heads, 1))
    pos[0, 0, 1:6] = -1                       # head 0: one valid prefix slot (0) and the window slot 6
    scores = np.random.default_rng(0).random((1, kv_heads, slots)).astype(np.float32)
    scores[0, 0, 0] = 10.0
    idx = np.asarray(live_select.select(method, jnp.zeros((1, kv_heads, slots, HEAD_DIM)), jnp.asarray(pos),
                                        jnp.asarray([slots], jnp.int32), 0, 1,
                                        window_attention=jnp.asarray(scores)))
    assert live(idx[0, 0]).tolist() == [0, 6]
    assert live(idx[0, 1]).tolist() == list(range(7))      # head 1 gets the shared slots head 0 cannot use


def oracle_kvpress_adakv(prefix_scores, n_kept, window, alpha):
    """kvpress's AdaKVPress rule over one row's `[K, P]` prefix scores, written out: the window scores
    max + 1; each head's top max(1, int(alpha * n)) pairs (window included) are safe; the layer keeps its
    K * n best pairs, no cap per head. Returns per head the kept prefix positions."""
    kv_heads, prefix = prefix_scores.shape
    full = np.concatenate([prefix_scores, np.full((kv_heads, window), prefix_scores.max() + 1)], axis=1)
    safe = max(1, int(alpha * n_kept))
    for h in range(kv_heads):
        full[h, np.argsort(-full[h], kind="stable")[:safe]] = np.inf
    best = np.argsort(-full.reshape(-1), kind="stable")[:kv_heads * n_kept]
    kept = [set() for _ in range(kv_heads)]
    for flat in best.tolist():
        if flat % full.shape[1] < prefix:
            kept[flat // full.shape[1]].add(flat % full.shape[1])
    return kept


@settings(max_examples=20)
@given(st.data())
def test_adakv_expresses_kvpress_safeguard_counted_with_the_window(data):
    """kvpress counts the safeguard with the window and caps no head; AdaKV(alpha', max_per_head=T - w)
    with int(alpha' (n - w)) = max(0, max(1, int(alpha n)) - w) keeps the same sets (the module
    docstring's claim; experiments/kvpress_parity.py checks it against kvpress itself)."""
    window = data.draw(st.integers(1, 8))
    n = window + data.draw(st.integers(1, 24))
    alpha = data.draw(st.sampled_from([0.2, 0.5, 0.9]))
    floor = max(0, max(1, int(alpha * n)) - window)
    q, k, lengths = data.draw(prompts(n, max_kv_heads=4))
    q[:, :q.shape[1] // k.shape[1]] *= 10  # KV head 0 attends sharply: the joint top-k leaves it few slots
    tokens = k.shape[2]
    method = sk.AdaKV(capacity=n, window=window, alpha=(floor + 0.5) / (n - window) if floor else 0.0,
                      max_per_head=tokens - window, kernel=5, pooling="avgpool")
    assert method.floor == floor
    idx = run(method, q, k, lengths)
    for b, length in enumerate(lengths):
        if length <= n:
            continue
        scores = oracle_scores(window_q(q[b], length, window).astype(np.float64), k[b].astype(np.float64),
                               length, method)
        expected = oracle_kvpress_adakv(scores, n, window, alpha)
        kept = [set(live(idx[b, h]).tolist()) - set(range(length - window, length)) for h in range(k.shape[1])]
        if kept != expected:  # float32 vs float64 ties only: the same total score
            total = sum(scores[h, sorted(s)].sum() for h, s in enumerate(kept))
            best = sum(scores[h, sorted(s)].sum() for h, s in enumerate(expected))
            assert abs(total - best) <= TIE_TOL * scores.max() * len(kept), f"row {b}: {kept} vs {expected}"


def test_adakv_oracle_check_rejects_a_wrong_allocation():
    scores = np.array([[0.9, 0.8, 0.1, 0.05], [0.7, 0.6, 0.5, 0.4]])
    method = sk.AdaKV(capacity=3, window=1, alpha=0.5)               # p = 2, floor 1, cap 4
    assert oracle_adakv(scores, method) == [{0, 1}, {0, 1}]
    assert_valid_adakv(scores, [{0, 1}, {0, 1}], method, "right")
    with pytest.raises(AssertionError):
        assert_valid_adakv(scores, [{0}, {0, 1, 2}], method, "wrong")  # 0.5 kept over 0.8
    with pytest.raises(AssertionError):
        assert_valid_adakv(scores, [{0, 1, 2, 3}, set()], method, "no safeguard")


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, message", [
    (lambda: sk.StreamingLLM(capacity=4, sinks=4), "capacity=4 must be greater than sinks=4"),
    (lambda: sk.H2O(capacity=32, window=32), "capacity=32 must be greater than window=32"),
    (lambda: sk.RandomKV(capacity=8, window=9), "capacity=8 must be greater than window=9"),
    (lambda: sk.AdaKV(capacity=64, window=32, alpha=1.5), "alpha=1.5 puts the per-head floor"),
    (lambda: sk.AdaKV(capacity=64, window=32, max_per_head=8), "max_per_head=8 is below"),
    (lambda: sk.PyramidKV(capacity=64, window=32, kernel=4), "kernel=4 must be an odd integer"),
    (lambda: sk.H2O(capacity=64.0), "must be an integer"),
])
def test_bad_knobs_raise_one_line_value_errors(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        make()
    assert "\n" not in str(info.value)


def test_pyramid_without_prefix_in_the_top_layer_is_refused_before_tracing():
    cfg = sk.ModelConfig.tiny()
    params = sk.init_params(cfg, __import__("jax").random.key(0))
    with pytest.raises(ValueError, match="leaves the top layer"):
        sk.prefill(params, cfg, np.zeros((1, 50), np.int32), compress=sk.PyramidKV(capacity=40, window=32))


def test_a_non_method_is_refused():
    cfg = sk.ModelConfig.tiny()
    params = sk.init_params(cfg, __import__("jax").random.key(0))
    with pytest.raises(ValueError, match="compress must be None or a compression method"):
        sk.prefill(params, cfg, np.zeros((1, 50), np.int32), compress="snapkv")
    with pytest.raises(ValueError, match="got Method \\(the base class\\)"):  # was an AttributeError
        sk.prefill(params, cfg, np.zeros((1, 50), np.int32), compress=sk.Method())


@pytest.mark.parametrize("build", [lambda: sk.Temperature(10**400), lambda: sk.AdaKV(capacity=64, alpha=10**400)])
def test_an_int_too_large_for_a_float_is_a_value_error(build):
    with pytest.raises(ValueError):  # was OverflowError from math.isfinite
        build()
