"""One context, many questions: `generate(..., context=ctx)` and `extend(..., context=ctx)` equal Q
independent runs over copies of the context (logits to 1e-5, greedy tokens equal), for a full and a
compressed context, and the compiled decode loop holds the context once, not once per question."""

import jax
import numpy as np
import pytest

import snapkv_jax as sk
from snapkv_jax import cache as kv
from snapkv_jax.generate import _decode_loop_program

CONTEXTS = {
    "full": None,
    "snapkv": sk.SnapKVConfig(window=4, capacity=16, kernel=3),
}
CONFIGS = {
    "gqa": sk.ModelConfig.tiny(),
    "mha-sliding": sk.ModelConfig.tiny(num_kv_heads=4, sliding_window=9),
}


def _tokens(cfg, rows, width, seed):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (rows, width)).astype(np.int32)


def _setup(cfg, method, questions):
    params = sk.init_params(cfg, jax.random.key(3))
    _, ctx = sk.prefill(params, cfg, _tokens(cfg, 1, 40, 0), compress=method)
    q = _tokens(cfg, questions, 9, 1)
    lengths = (np.arange(questions) % 9 + 1).astype(np.int32)[::-1].copy()   # ragged
    return params, ctx, q, lengths


CASES = [(name, ctx, q) for name, qs in (("gqa", (1, 5)), ("mha-sliding", (3,))) for ctx in CONTEXTS for q in qs]


@pytest.mark.parametrize("name, context, questions", [(n, CONTEXTS[c], q) for n, c, q in CASES],
                         ids=[f"{n}-{c}-{q}" for n, c, q in CASES])
def test_shared_context_equals_independent_copies(name, context, questions):
    cfg = CONFIGS[name]
    params, ctx, q, lengths = _setup(cfg, context, questions)
    logits, own = sk.extend(params, cfg, None, q, lengths, context=ctx)
    # the rows' own slots hold only their question, at positions after the context's
    np.testing.assert_array_equal(np.asarray(kv.valid_slots(own))[:, :, 0], np.broadcast_to(lengths, (cfg.num_layers, questions)))
    assert int(np.asarray(own.pos[0]).max(initial=-1)) == int(ctx.next_pos[0]) + int(lengths.max()) - 1
    out = sk.generate(params, cfg, q, lengths, context=ctx, max_new_tokens=6)
    for r in range(questions):
        copy_logits, copy = sk.extend(params, cfg, ctx, q[r:r + 1], lengths[r:r + 1])
        np.testing.assert_allclose(logits[r], copy_logits[0], atol=1e-5, err_msg=f"question {r}")
        step, _ = sk.decode_step(params, cfg, q[r:r + 1, 0], copy)
        np.testing.assert_allclose(sk.decode_step(params, cfg, q[:, 0], own, context=ctx)[0][r], step[0],
                                   atol=1e-5, err_msg=f"decode step, question {r}")
        ref = sk.generate(params, cfg, q[r:r + 1], lengths[r:r + 1], cache=ctx, max_new_tokens=6)
        np.testing.assert_array_equal(out.tokens[r], ref.tokens[0], err_msg=f"question {r}")
        assert int(out.lengths[r]) == int(ref.lengths[0])


def test_per_row_state_continues_each_conversation():
    cfg = CONFIGS["gqa"]
    params, ctx, q, lengths = _setup(cfg, CONTEXTS["snapkv"], 3)
    first = sk.generate(params, cfg, q, lengths, context=ctx, max_new_tokens=4)
    # the state holds everything but each row's last generated token: the next turn starts with it
    follow = np.concatenate([np.asarray(first.tokens)[:, 3:4], _tokens(cfg, 3, 5, 7)], axis=1)
    second = sk.generate(params, cfg, follow, max_new_tokens=5, context=ctx, cache=first.cache)
    for r in range(3):
        alone = sk.generate(params, cfg, q[r:r + 1], lengths[r:r + 1], cache=ctx, max_new_tokens=4)
        np.testing.assert_array_equal(alone.tokens[0], first.tokens[r])
        again = sk.generate(params, cfg, follow[r:r + 1], max_new_tokens=5, cache=alone.cache)
        np.testing.assert_array_equal(again.tokens[0], second.tokens[r], err_msg=f"question {r}")


def _loop_bytes(params, cfg, logits, cache, context):
    """Compiled decode loop's argument + output + temporary bytes (aliases not double-counted)."""
    compiled = _decode_loop_program().lower(
        params, logits, cache, context, np.int32(8), np.uint32(0), np.float32(1e-6), np.float32(1.0),
        np.int32(-1), cfg=cfg, budget=32, greedy=True, top_k=0, use_top_p=False).compile()
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def test_compiled_decode_loop_holds_the_context_once():
    cfg = CONFIGS["gqa"]
    params = sk.init_params(cfg, jax.random.key(3))
    _, ctx = sk.prefill(params, cfg, _tokens(cfg, 1, 400, 0))
    context_bytes = kv.allocated_bytes(ctx)
    sizes, copied = {}, {}
    for rows in (1, 8):
        q, lengths = _tokens(cfg, rows, 8, 1), np.full((rows,), 8, np.int32)
        logits, own = sk.extend(params, cfg, None, q, lengths, context=ctx)
        own = kv.widen(own, 32)
        sizes[rows] = (_loop_bytes(params, cfg, logits, own, ctx), kv.allocated_bytes(own))
        logits, rows_cache = sk.extend(params, cfg, kv.take_rows(ctx, [0] * rows), q, lengths)
        copied[rows] = _loop_bytes(params, cfg, logits, kv.widen(rows_cache, 32), None)
    growth = sizes[8][0] - sizes[1][0]
    own_growth = sizes[8][1] - sizes[1][1]
    # the rows' own slots (in, out and the loop's copy) and per-row activations, not 7 more contexts
    assert growth < 4 * own_growth + context_bytes, (growth, own_growth, context_bytes)
    assert copied[8] - sizes[8][0] > 7 * context_bytes, (copied[8], sizes[8][0], context_bytes)


def test_context_from_another_model_is_refused():
    cfg = CONFIGS["gqa"]
    params, ctx, q, lengths = _setup(cfg, None, 2)
    other = sk.ModelConfig.tiny(num_kv_heads=4)
    _, foreign = sk.prefill(sk.init_params(other, jax.random.key(0)), other, _tokens(other, 1, 12, 0))
    with pytest.raises(ValueError, match="context was built for another model"):
        sk.generate(params, cfg, q, lengths, context=foreign, max_new_tokens=2)
    with pytest.raises(ValueError, match="context must be the cache of one context"):
        sk.decode_step(params, cfg, q[:, 0], kv.take_rows(ctx, [0, 0]), context=kv.take_rows(ctx, [0, 0]))
