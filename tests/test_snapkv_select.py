"""SnapKV selection (`snapkv_jax.snapkv.select`) against a deliberately plain float64 oracle.

The oracle follows the official algorithm (arXiv 2404.14469, Listing 1) one row, one query head and one
window query at a time, with explicit pooling loops, so it shares no code or vectorisation with the
implementation. Max pooling makes plateaus, so tied scores are real: where the kept sets differ, the
result is accepted only if it is another valid top-k under the oracle's scores.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import snapkv_jax as sk
from snapkv_jax import SnapKV
from snapkv_jax.snapkv import gather_kept, pool_scores, select

HEAD_DIM = 16
# Scores come out of float32 softmaxes; the oracle is float64. Differences below this are ties.
TIE_TOL = 1e-5


# ---------------------------------------------------------------------------------------------- oracle
def oracle_pool(x, kernel, pooling):
    """Pools one head's prefix scores `x [P]` with explicit loops (torch avg/max_pool1d semantics)."""
    if pooling == "none":
        return x.copy()
    prefix, r = len(x), kernel // 2
    out = np.empty(prefix)
    for j in range(prefix):
        inside = [x[j + d] for d in range(-r, r + 1) if 0 <= j + d < prefix]
        out[j] = sum(inside) / kernel if pooling == "avgpool" else max(inside)
    return out


def oracle_scores(q, k, length, snap):
    """One row: q `[H, w, D]`, k `[K, T, D]` -> `[K, P]` float64 pooled, GQA-reduced prefix scores."""
    heads, w, d = q.shape
    kv_heads = k.shape[0]
    group, prefix = heads // kv_heads, length - w
    per_head = np.zeros((heads, prefix))
    for h in range(heads):
        acc = np.zeros(prefix)
        for i in range(w):
            visible = length - w + i + 1  # keys 0 .. L-w+i
            logits = k[h // group, :visible] @ q[h, i] / math.sqrt(d)
            p = np.exp(logits - logits.max())
            acc += (p / p.sum())[:prefix]
        per_head[h] = oracle_pool(acc, snap.kernel, snap.pooling)
    grouped = per_head.reshape(kv_heads, group, prefix)
    return grouped.mean(axis=1) if snap.gqa_reduce == "mean" else grouped.max(axis=1)


def is_valid_top_k(scores, kept, budget, tol=TIE_TOL):
    """Whether `kept` (prefix positions) is a top-`budget` set of `scores [P]`: the right size, unique,
    in range, and no dropped position scores above a kept one by more than `tol` (relative to the max)."""
    kept = np.asarray(sorted(kept))
    if len(kept) != budget or len(set(kept.tolist())) != budget:
        return False
    if kept.min() < 0 or kept.max() >= len(scores):
        return False
    dropped = np.setdiff1d(np.arange(len(scores)), kept)
    if dropped.size == 0:
        return True
    return scores[kept].min() >= scores[dropped].max() - tol * max(scores.max(), 1e-30)


def assert_matches_oracle(idx, q, k, lengths, snap):
    """Checks `select`'s `[B, K, C]` output row by row against the oracle."""
    for b, length in enumerate(lengths):
        if length <= snap.capacity:
            expected = np.where(np.arange(snap.capacity) < length, np.arange(snap.capacity), -1)
            np.testing.assert_array_equal(idx[b], np.broadcast_to(expected, idx[b].shape))
            continue
        scores = oracle_scores(q[b].astype(np.float64), k[b].astype(np.float64), length, snap)
        window = set(range(length - snap.window, length))
        for head in range(k.shape[1]):
            kept = set(idx[b, head].tolist())
            assert window <= kept, f"row {b} head {head} dropped window positions {window - kept}"
            prefix_kept = kept - window
            ref = set(np.argsort(-scores[head], kind="stable")[: snap.prefix_budget].tolist())
            if prefix_kept != ref:
                assert is_valid_top_k(scores[head], prefix_kept, snap.prefix_budget), (
                    f"row {b} head {head}: kept {sorted(prefix_kept - ref)} over {sorted(ref - prefix_kept)}")


# ------------------------------------------------------------------------------------------ strategies
@st.composite
def snap_inputs(draw, max_group=8, max_window=64):
    """(q [B, H, w, D], k [B, K, T, D], lengths [B], snap) with ragged lengths around the capacity."""
    group = draw(st.integers(1, max_group))
    kv_heads = draw(st.integers(1, 2))
    window = draw(st.integers(1, max_window))
    budget = draw(st.integers(1, 24))
    snap = SnapKV(window=window, capacity=window + budget, kernel=draw(st.sampled_from([1, 3, 5, 7])),
                        pooling=draw(st.sampled_from(["maxpool", "avgpool", "none"])),
                        gqa_reduce=draw(st.sampled_from(["mean", "max"])))
    tokens = snap.capacity + draw(st.integers(1, 40))
    length = st.one_of(st.just(snap.capacity + 1), st.just(tokens), st.integers(1, snap.capacity),
                       st.integers(snap.capacity + 1, tokens))
    lengths = draw(st.lists(length, min_size=1, max_size=3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Scale 2 makes attention peaky enough that pooling and top-k matter.
    q = (2 * rng.standard_normal((len(lengths), group * kv_heads, window, HEAD_DIM))).astype(np.float32)
    k = rng.standard_normal((len(lengths), kv_heads, tokens, HEAD_DIM)).astype(np.float32)
    return q, k, np.asarray(lengths, np.int32), snap


def run_select(q, k, lengths, snap, impl="xla"):
    return np.array(select(jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths), snap, impl=impl))


# ------------------------------------------------------------------------------------------------ tests
@settings(max_examples=30)
@given(snap_inputs())
def test_select_matches_plain_oracle(inputs):
    q, k, lengths, snap = inputs
    assert_matches_oracle(run_select(q, k, lengths, snap), q, k, lengths, snap)


def test_top_k_check_accepts_ties_and_rejects_a_wrong_set():
    scores = np.array([0.5, 0.9, 0.9, 0.1, 0.3])
    assert is_valid_top_k(scores, {1, 2}, 2)
    assert is_valid_top_k(np.array([0.9, 0.5, 0.5, 0.1]), {0, 2}, 2)  # either 0.5 completes the set
    assert not is_valid_top_k(scores, {1, 4}, 2)  # swapped kept 2 (0.9) for dropped 4 (0.3)
    assert not is_valid_top_k(scores, {1}, 2)
    assert not is_valid_top_k(scores, {1, 1}, 2)


def test_oracle_comparison_rejects_a_corrupted_selection():
    q, k, lengths, snap = next_example()
    idx = run_select(q, k, lengths, snap)
    scores = oracle_scores(q[0].astype(np.float64), k[0].astype(np.float64), int(lengths[0]), snap)
    prefix = np.arange(lengths[0] - snap.window)
    kept = np.intersect1d(idx[0, 0], prefix)
    dropped = np.setdiff1d(prefix, kept)
    best_kept = kept[np.argmax(scores[0][kept])]
    worst_dropped = dropped[np.argmin(scores[0][dropped])]
    assert scores[0][best_kept] - scores[0][worst_dropped] > 100 * TIE_TOL  # not a tie
    idx[0, 0] = np.sort(np.where(idx[0, 0] == best_kept, worst_dropped, idx[0, 0]))
    with pytest.raises(AssertionError):
        assert_matches_oracle(idx, q, k, lengths, snap)


def next_example():
    """A fixed, tie-free row with L > C (pooling "none" on random data)."""
    rng = np.random.default_rng(0)
    snap = SnapKV(window=4, capacity=12, kernel=1, pooling="none")
    q = (2 * rng.standard_normal((1, 2, 4, HEAD_DIM))).astype(np.float32)
    k = rng.standard_normal((1, 1, 40, HEAD_DIM)).astype(np.float32)
    return q, k, np.array([40], np.int32), snap


@settings(max_examples=6)
@given(snap_inputs())
def test_window_positions_always_kept(inputs):
    q, k, lengths, snap = inputs
    idx = run_select(q, k, lengths, snap)
    for b, length in enumerate(lengths):
        window = np.arange(max(length - snap.window, 0), length)
        for head in range(k.shape[1]):
            assert np.isin(window, idx[b, head]).all()


@settings(max_examples=6)
@given(snap_inputs())
def test_kept_positions_unique_ascending_and_below_length(inputs):
    q, k, lengths, snap = inputs
    idx = run_select(q, k, lengths, snap)
    assert idx.shape == (len(lengths), k.shape[1], snap.capacity) and idx.dtype == np.int32
    for b, length in enumerate(lengths):
        for head in range(k.shape[1]):
            live = idx[b, head][idx[b, head] >= 0]
            assert len(live) == min(length, snap.capacity)
            assert (np.diff(live) > 0).all() and live.max() < length


@settings(max_examples=6)
@given(snap_inputs(), st.integers(0, 2**32 - 1))
def test_padding_is_never_selected_and_never_matters(inputs, seed):
    q, k, lengths, snap = inputs
    rng = np.random.default_rng(seed)
    loud = k.copy()
    for b, length in enumerate(lengths):
        # Padding keys aligned with the window queries would win every softmax if they were looked at.
        loud[b, :, length:] = 50 * rng.standard_normal(loud[b, :, length:].shape)
    np.testing.assert_array_equal(run_select(q, loud, lengths, snap), run_select(q, k, lengths, snap))


@settings(max_examples=5)
@given(snap_inputs())
def test_row_result_independent_of_other_rows(inputs):
    q, k, lengths, snap = inputs
    batch = run_select(q, k, lengths, snap)
    for b in range(len(lengths)):
        alone = run_select(q[b:b + 1], k[b:b + 1], lengths[b:b + 1], snap)
        np.testing.assert_array_equal(batch[b:b + 1], alone)


@pytest.mark.parametrize("length", [1, 3, 8, 20])
def test_short_rows_keep_everything_then_minus_one(length):
    snap = SnapKV(window=8, capacity=20, kernel=3)
    rng = np.random.default_rng(length)
    q = rng.standard_normal((2, 2, 8, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((2, 1, 32, HEAD_DIM)).astype(np.float32)
    idx = run_select(q, k, np.array([length, 32], np.int32), snap)
    expected = np.where(np.arange(20) < length, np.arange(20), -1)
    np.testing.assert_array_equal(idx[0, 0], expected)
    assert (idx[1] >= 0).all()


def test_prompt_no_wider_than_capacity_returns_all_positions():
    snap = SnapKV(window=4, capacity=16)
    q = np.ones((2, 2, 4, HEAD_DIM), np.float32)
    k = np.ones((2, 2, 10, HEAD_DIM), np.float32)
    idx = run_select(q, k, np.array([10, 6], np.int32), snap)
    np.testing.assert_array_equal(idx[1, 1], np.where(np.arange(16) < 6, np.arange(16), -1))


def test_select_runs_under_jit_with_traced_lengths():
    q, k, lengths, snap = next_example()
    jitted = jax.jit(lambda q, k, lengths: select(q, k, lengths, snap))
    np.testing.assert_array_equal(np.asarray(jitted(q, k, lengths)), run_select(q, k, lengths, snap))


def test_select_takes_numpy_arrays_and_lists_for_its_arrays():
    """Both selection entry points take what a notebook hands them (numpy arrays, a list of lengths),
    with the results of jax arrays, not an AttributeError."""
    q, k, lengths, snap = next_example()
    want = run_select(q, k, lengths, snap)
    np.testing.assert_array_equal(np.asarray(select(q, k, lengths.tolist(), snap, impl="xla")), want)
    queries = np.concatenate([np.zeros((1, 2, 36, HEAD_DIM), np.float32), q], axis=2)   # window last
    via_family = sk.compression.select(snap, queries, k, [40], impl="xla")
    np.testing.assert_array_equal(np.asarray(via_family), want)


def test_select_takes_the_settings_by_design_s_keyword_and_its_old_one():
    """DESIGN spells the call `sk.snapkv.select(q_window, keys, lengths, snapkv)`; the keyword was `snap`
    (kept as an alias). Both keywords, or neither, are refused in one line."""
    q, k, lengths, snap = next_example()
    want = run_select(q, k, lengths, snap)
    for got in (sk.snapkv.select(q, k, lengths, snapkv=snap, impl="xla"),
                sk.snapkv.select(q, k, lengths, snap=snap, impl="xla")):
        np.testing.assert_array_equal(np.asarray(got), want)
    for kwargs in ({}, {"snapkv": snap, "snap": snap}):
        with pytest.raises(ValueError, match="give the SnapKV settings once"):
            sk.snapkv.select(q, k, lengths, **kwargs)


@pytest.mark.parametrize("pooling", ["avgpool", "maxpool"])
@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_pooling_matches_torch_on_the_prefix(pooling, kernel):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(kernel)
    scores = rng.random((2, 3, 30)).astype(np.float32)
    prefix = np.array([30, 17], np.int32)
    ours = np.asarray(pool_scores(jnp.asarray(scores), jnp.asarray(prefix), kernel, pooling))
    pool = (lambda x: torch.nn.functional.avg_pool1d(x, kernel, 1, kernel // 2)) if pooling == "avgpool" \
        else (lambda x: torch.nn.functional.max_pool1d(x, kernel, 1, kernel // 2))
    for b, p in enumerate(prefix):
        theirs = pool(torch.from_numpy(scores[b:b + 1, :, :p])).numpy()[0]
        np.testing.assert_allclose(ours[b, :, :p], theirs, rtol=1e-6)


def test_gather_kept_takes_slots_and_zeroes_padding():
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.standard_normal((1, 2, 6, 4)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((1, 2, 6, 4)), jnp.bfloat16)
    idx = jnp.asarray([[[0, 2, 5], [1, -1, -1]]], jnp.int32)
    k_kept, v_kept, pos = gather_kept(k, v, idx)
    assert k_kept.shape == (1, 2, 3, 4) and k_kept.dtype == jnp.bfloat16 and pos.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(k_kept[0, 0]), np.asarray(k[0, 0, [0, 2, 5]]))
    np.testing.assert_array_equal(np.asarray(v_kept[0, 1, 0]), np.asarray(v[0, 1, 1]))
    assert not np.asarray(k_kept[0, 1, 1:]).any() and not np.asarray(v_kept[0, 1, 1:]).any()
    np.testing.assert_array_equal(np.asarray(pos), np.asarray(idx))


def _bad(q_shape=(1, 4, 4, 16), k_shape=(1, 2, 32, 16), l_shape=(1,), snap=SnapKV(window=4, capacity=16), impl="xla",
         lengths=None):
    lengths = jnp.full(l_shape, 20, jnp.int32) if lengths is None else lengths
    select(jnp.zeros(q_shape), jnp.zeros(k_shape), lengths, snap, impl=impl)


@pytest.mark.parametrize("kwargs, message", [
    (dict(q_shape=(2, 4, 4, 16)), "batch mismatch"),
    (dict(l_shape=(3,)), "batch mismatch"),
    (dict(k_shape=(1, 2, 32, 8)), "head_dim mismatch"),
    (dict(k_shape=(1, 3, 32, 16)), "not a multiple of KV heads 3"),
    (dict(q_shape=(1, 4, 5, 16)), "5 queries but snap.window=4"),
    (dict(q_shape=(4, 4, 16)), "expected q_window"),
    (dict(impl="cuda"), "'cuda'"),
    (dict(q_shape=(1, 4, 4, 24), k_shape=(1, 2, 32, 24), impl="pallas"), "head_dim=24"),
    (dict(snap=dict(window=4)), "must be a SnapKV"),
    (dict(lengths=jnp.asarray([7.9])), "lengths must be integers, got dtype float32"),
    (dict(lengths=jnp.asarray([33])), "lengths must be in \\[1, 32\\] \\(the keys' tokens\\), got \\[33\\]"),
    (dict(lengths=jnp.asarray([0])), "lengths must be in \\[1, 32\\]"),
])
def test_bad_input_raises_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _bad(**kwargs)


@pytest.mark.parametrize("lengths, message", [
    ([7.9], "lengths must be integers, got dtype float32"),     # was truncated to 7
    ([20], "lengths must be in \\[1, 8\\]"),                    # returned positions 18, 19 of 8 keys
    ([-3], "lengths must be in \\[1, 8\\]"),                    # returned -1s
])
def test_family_select_refuses_lengths_outside_the_keys(lengths, message):
    with pytest.raises(ValueError, match=message):
        sk.compression.select(sk.H2O(capacity=4, window=2), jnp.zeros((1, 4, 8, 16)), jnp.zeros((1, 2, 8, 16)),
                              jnp.asarray(lengths), impl="xla")


def test_gather_kept_rejects_mismatched_shapes():
    k = jnp.zeros((1, 2, 6, 4))
    with pytest.raises(ValueError, match="share one"):
        gather_kept(k, jnp.zeros((1, 2, 5, 4)), jnp.zeros((1, 2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"idx must be \[B, K, C\]"):
        gather_kept(k, k, jnp.zeros((1, 3, 3), jnp.int32))


@pytest.mark.parametrize("fields, message", [
    (dict(window=0), "window must be a positive integer"),
    (dict(window=True), "window must be an integer, got True"),
    (dict(capacity=32.0), "capacity must be an integer"),
    (dict(window=8, capacity=8), "capacity=8 must be an integer greater than window=8"),
    (dict(kernel=4), "kernel=4 must be an odd integer"),
    (dict(pooling="max"), "unknown SnapKV pooling 'max'"),
    (dict(gqa_reduce="sum"), "unknown SnapKV gqa_reduce 'sum'"),
])
def test_snapkv_config_rejects_bad_knobs(fields, message):
    with pytest.raises(ValueError, match=message):
        SnapKV(**fields)


def test_snapkv_knobs_are_keyword_only():
    """`SnapKV(64)` meant window=64 (SnapKVConfig's order) while every other method reads its first
    argument as the capacity, so the cache silently stayed whole (an audit): positional knobs are refused."""
    with pytest.raises(TypeError, match="positional argument"):
        SnapKV(64)
    with pytest.raises(TypeError, match="positional argument"):
        sk.SnapKVConfig(16, 64)
    assert SnapKV(capacity=64).capacity == 64


def test_snapkv_config_takes_numpy_integers_as_ints():
    snap = SnapKV(window=np.int64(8), capacity=np.int32(64), kernel=np.int16(3))
    assert snap == SnapKV(window=8, capacity=64, kernel=3) and type(snap.window) is int


def test_snapkv_config_is_the_snapkv_method_under_its_old_names():
    assert sk.SnapKVConfig is sk.SnapKV is sk.compression.SnapKV and isinstance(sk.SnapKV(), sk.Method)
    assert sk.SnapKV().describe() == "snapkv(window=32, capacity=1024, kernel=7, pooling='maxpool', gqa_reduce='mean')"
    # every name sk.snapkv exported before SnapKV moved into snapkv_jax.compression
    for name in ("gather_kept", "pool_scores", "pooled_scores", "reduce_gqa", "resolve_impl", "select",
                 "select_layer", "window_scores", "window_scores_reference"):
        assert callable(getattr(sk.snapkv, name)), name


def test_select_equals_the_family_entry_point():
    q, k, lengths, snap = next_example()
    queries = np.zeros((q.shape[0], q.shape[1], k.shape[2], q.shape[3]), np.float32)
    for b, n in enumerate(np.asarray(lengths)):  # whole-prompt queries whose last w rows are q_window
        queries[b, :, n - snap.window:n] = q[b]
    family = sk.compression.select(snap, jnp.asarray(queries), jnp.asarray(k), jnp.asarray(lengths), impl="xla")
    np.testing.assert_array_equal(np.asarray(family), run_select(q, k, lengths, snap))
