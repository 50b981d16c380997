"""One context, many questions: `generate(..., context=ctx)` and `extend(..., context=ctx)` equal Q
independent runs over copies of the context (logits to 1e-5, greedy tokens equal), for a full and a
compressed context, and the compiled decode loop holds the context once, not once per question."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import snapkv_jax as sk
from snapkv_jax import cache as kv
from snapkv_jax.generate import _decode_loop_program

CONTEXTS = {
    "full": None,
    "snapkv": sk.SnapKV(window=4, capacity=16, kernel=3),
    "kvzip": sk.KVzip(capacity=16, sinks=2, chunk=16, repeat=(5, 6, 7), resume=(8, 9), suffix=(10,), overlap=3),
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


CASES = [(name, ctx, q) for name, qs in (("gqa", (1, 5)), ("mha-sliding", (3,))) for ctx in ("full", "snapkv")
         for q in qs] + [("gqa", "kvzip", 3)]


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


def test_decode_loop_pins_its_cache_layout():
    """Every layer's k, v and pos in the decode loop's carry are pinned row-major (cache.row_major): on an
    H200, unpinned, XLA laid 64 rows' keys out heads-major and copied them into and out of the loop (a
    2.03 GiB temporary). The CPU backend keeps row-major anyway, so this checks the pins are there, and
    that they change no value."""
    cfg = CONFIGS["gqa"]
    params, ctx, q, lengths = _setup(cfg, None, 2)
    logits, own = sk.extend(params, cfg, None, q, lengths, context=ctx)
    own = kv.widen(own, 8)
    text = _decode_loop_program().lower(
        params, logits, own, ctx, np.int32(4), np.uint32(0), np.float32(1e-6), np.float32(1.0), np.int32(-1),
        cfg=cfg, budget=8, greedy=True, top_k=0, use_top_p=False).as_text()
    assert text.count("@LayoutConstraint") == 3 * cfg.num_layers
    pinned = jax.jit(kv.row_major)(own)
    for got, want in zip(jax.tree_util.tree_leaves(pinned), jax.tree_util.tree_leaves(own)):
        np.testing.assert_array_equal(got, want)


def test_context_from_another_model_is_refused():
    cfg = CONFIGS["gqa"]
    params, ctx, q, lengths = _setup(cfg, None, 2)
    other = sk.ModelConfig.tiny(num_kv_heads=4)
    _, foreign = sk.prefill(sk.init_params(other, jax.random.key(0)), other, _tokens(other, 1, 12, 0))
    with pytest.raises(ValueError, match="context was built for another model"):
        sk.generate(params, cfg, q, lengths, context=foreign, max_new_tokens=2)
    with pytest.raises(ValueError, match="context must be the cache of one context"):
        sk.decode_step(params, cfg, q[:, 0], kv.take_rows(ctx, [0, 0]), context=kv.take_rows(ctx, [0, 0]))


def test_rows_used_with_another_context_or_none_are_refused():
    """A rows' cache prefilled on its own holds positions the context holds too (before, every row silently
    attended to two tokens at each); rows' own slots used without their context, or with a shorter one,
    silently answered from the wrong document, and so did rows handed another document of the same
    length (found by an audit). Each is a one-line ValueError that changes nothing."""
    cfg = CONFIGS["gqa"]
    params, ctx, q, lengths = _setup(cfg, None, 2)
    _, alone = sk.prefill(params, cfg, q, lengths, max_slots=40)              # positions 0 .., not 40 ..
    _, own = sk.extend(params, cfg, None, q, lengths, context=ctx)            # the rows' own: 40 ..
    _, shorter = sk.prefill(params, cfg, _tokens(cfg, 1, 30, 0))
    _, other = sk.prefill(params, cfg, _tokens(cfg, 1, 40, 7))                # same length, other tokens
    state = sk.generate(params, cfg, q, lengths, context=ctx, max_new_tokens=3).cache
    stepped = sk.decode_step(params, cfg, q[:, 0], own, context=ctx)[1]
    grown = sk.extend(params, cfg, own, q, lengths, context=ctx)[1]
    before = jax.tree_util.tree_map(np.asarray, (alone, own, state, stepped, grown))
    cases = [(alone, ctx, "this one was not started on a context"),
             (own, None, "started with context=\\): pass the same context= again"),
             (state, None, "pass the same context= again"),
             (own, shorter, "row 0 of the cache starts at position 40, but this context's positions run to 29"),
             *((rows, other, "row 0 of the cache was started on another context of the same length \\(40 positions")
               for rows in (own, state, stepped, grown))]
    for cache, context, message in cases:
        for call in (lambda: sk.extend(params, cfg, cache, q, lengths, context=context),
                     lambda: sk.generate(params, cfg, q, lengths, cache=cache, context=context, max_new_tokens=2),
                     lambda: sk.decode_step(params, cfg, q[:, 0], cache, context=context)):
            with pytest.raises(ValueError, match=message) as info:
                call()
            assert "\n" not in str(info.value)
    for x, y in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves((alone, own, state, stepped, grown))):
        np.testing.assert_array_equal(x, y)
    sk.decode_step(params, cfg, q[:, 0], own, context=ctx)                    # the rows that do continue it
    sk.generate(params, cfg, q, lengths, cache=state, context=ctx, max_new_tokens=2)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_flash_context_equals_the_jnp_path_on_gpu():
    import jax.numpy as jnp
    from snapkv_jax.generate import _decode, context_flash
    cfg = sk.ModelConfig.tiny(num_heads=8, num_kv_heads=2, head_dim=64, hidden_size=256)
    params = sk.init_params(cfg, jax.random.key(3), jnp.bfloat16)
    for method in (CONTEXTS["full"], CONTEXTS["snapkv"]):
        _, ctx = sk.prefill(params, cfg, _tokens(cfg, 1, 300, 0), compress=method)
        assert context_flash(params, cfg, ctx)
        q, lengths = _tokens(cfg, 5, 9, 1), np.array([9, 1, 4, 7, 2], np.int32)
        _, own = sk.extend(params, cfg, None, q, lengths, context=ctx)
        flash, _ = _decode(params, q[:, 0], own, ctx, cfg=cfg, flash_context=True)
        plain, _ = _decode(params, q[:, 0], own, ctx, cfg=cfg, flash_context=False)
        np.testing.assert_allclose(np.asarray(flash), np.asarray(plain), atol=0.05)
        np.testing.assert_array_equal(np.argmax(np.asarray(flash), -1), np.argmax(np.asarray(plain), -1))


def _cudnn_stand_in(q, k, v, *, causal, kv_seqlen=None, sliding_window=None):
    """What `chunked_attention._cudnn` computes, in jnp (unmasked attention over each batch entry's first
    kv_seqlen keys, GQA, head-major), so the split-K bookkeeping around it is checked on the CPU."""
    assert not causal and sliding_window is None
    b, h, c, d = q.shape
    kk = jnp.repeat(k, h // k.shape[1], axis=1)                                    # [b, h, S, D]
    logits = jnp.einsum("bhcd,bhsd->bhcs", q.astype(jnp.float32), kk.astype(jnp.float32)) / np.sqrt(d)
    seen = jnp.arange(k.shape[2])[None, :] < jnp.broadcast_to(kv_seqlen, (b,))[:, None]   # [b, S]
    logits = jnp.where(seen[:, None, None, :], logits, -jnp.inf)
    out = jnp.einsum("bhcs,bhsd->bhcd", jax.nn.softmax(logits, -1), jnp.repeat(v, h // v.shape[1], 1))
    return out.astype(q.dtype), jax.nn.logsumexp(logits, -1)


@pytest.mark.parametrize("slots, occupied", [(4096, 4096), (4096, 1000), (4096, 1), (1024, 700), (96, 50)])
def test_split_flash_merge_equals_the_jnp_path(monkeypatch, slots, occupied):
    """The context split into key blocks per KV head (empty blocks included) and merged by log-sum-exp
    equals one softmax over the occupied prefix; the own part merges on top as before."""
    from snapkv_jax.models import chunked_attention, slot_attention
    monkeypatch.setattr(chunked_attention, "_cudnn", _cudnn_stand_in)
    rng = np.random.default_rng(slots + occupied)
    b, c, heads, kv_heads, d, own = 3, 2, 6, 2, 16, 5
    q = jnp.asarray(rng.normal(size=(b, c, heads, d)), jnp.float32)
    ctx_pos = np.where(np.arange(slots) < occupied, np.arange(slots), -1).astype(np.int32)
    ctx = slot_attention.SlotPart(jnp.asarray(rng.normal(size=(1, kv_heads, slots, d)), jnp.float32),
                                  jnp.asarray(rng.normal(size=(1, kv_heads, slots, d)), jnp.float32),
                                  jnp.broadcast_to(jnp.asarray(ctx_pos), (1, kv_heads, slots)), shared=True)
    own_pos = jnp.asarray(rng.integers(-1, 2 * slots, (b, kv_heads, own)), jnp.int32)
    mine = slot_attention.SlotPart(jnp.asarray(rng.normal(size=(b, kv_heads, own, d)), jnp.float32),
                                   jnp.asarray(rng.normal(size=(b, kv_heads, own, d)), jnp.float32), own_pos)
    query_pos = jnp.full((b, c), 2 * slots, jnp.int32)
    assert slot_attention._flash_splits(slots, heads, b * c) == {4096: 8, 1024: 2, 96: 1}[slots]
    assert slot_attention._flash_splits(32768, 32, 64) == 4                      # 7B shape: one wave of 128 items
    with jax.default_matmul_precision("float32"):  # a GPU's default runs float32 dots in TF32 (2e-4 off)
        plain = slot_attention.attend_slots(q, query_pos, (mine, ctx), None)
        flash = slot_attention.attend_slots(q, query_pos, (mine, ctx.replace(flash=True)), None)
    np.testing.assert_allclose(np.asarray(flash), np.asarray(plain), atol=1e-5, rtol=1e-5)


def test_decode_loop_over_a_split_flash_context_equals_the_jnp_path(monkeypatch):
    """generate's decode loop reading the context by the split-K flash path (cuDNN stood in for by
    `_cudnn_stand_in`; the context's key blocks computed once, before the loop) emits the tokens and
    writes the caches of the jnp path."""
    from snapkv_jax.models import chunked_attention, slot_attention
    monkeypatch.setattr(chunked_attention, "_cudnn", _cudnn_stand_in)
    cfg = CONFIGS["gqa"]
    params = sk.init_params(cfg, jax.random.key(3))
    _, ctx = sk.prefill(params, cfg, _tokens(cfg, 1, 1500, 0))
    ctx = kv.widen(ctx, 500)                          # 2,000 slots: two key blocks, the second half empty
    q, lengths = _tokens(cfg, 3, 9, 1), np.array([9, 1, 4], np.int32)
    assert slot_attention._flash_splits(ctx.k[0].shape[2], cfg.num_heads, len(q)) == 2
    logits, own = sk.extend(params, cfg, None, q, lengths, context=ctx)
    own = kv.widen(own, 16)

    def run(flash):  # the loop donates its cache: each run gets its own copy
        mine = jax.tree.map(jnp.copy, own)
        with jax.default_matmul_precision("float32"):  # float32 dots, as generate runs them (not TF32)
            return _decode_loop_program()(params, logits, mine, ctx, np.int32(12), np.uint32(0), np.float32(1e-6),
                                          np.float32(1.0), np.int32(-1), cfg=cfg, budget=16, greedy=True,
                                          top_k=0, use_top_p=False, flash_context=flash)
    flash, plain = run(True), run(False)
    np.testing.assert_array_equal(np.asarray(flash.tokens), np.asarray(plain.tokens))
    for a, b in zip(flash.cache.k + flash.cache.v, plain.cache.k + plain.cache.v):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_extend_and_decode_step_over_a_split_flash_context_equal_the_jnp_path(monkeypatch):
    """A question's extend and a decode step reading the context by the split-K flash path (cuDNN stood
    in for by `_cudnn_stand_in`; the context's key blocks computed once per context and query count, then
    remembered) give the logits and the own cache of the jnp path, on the first call and the next."""
    from snapkv_jax.models import chunked_attention
    generate = importlib.import_module("snapkv_jax.generate")
    cfg = CONFIGS["gqa"]
    params = sk.init_params(cfg, jax.random.key(3))
    _, ctx = sk.prefill(params, cfg, _tokens(cfg, 1, 1500, 0))
    ctx = kv.widen(ctx, 500)                          # 2,000 slots: two key blocks, the second half empty
    q, lengths = _tokens(cfg, 3, 9, 1), np.array([9, 1, 4], np.int32)
    plain_logits, plain = sk.extend(params, cfg, None, q, lengths, context=ctx)
    plain_step = sk.decode_step(params, cfg, q[:, 0], plain, context=ctx)
    monkeypatch.setattr(chunked_attention, "_cudnn", _cudnn_stand_in)
    monkeypatch.setattr(generate, "context_flash", lambda *args: True)
    computed = []
    real_blocks = generate._flash_blocks
    monkeypatch.setattr(generate, "_flash_blocks", lambda *a, **k: computed.append(k) or real_blocks(*a, **k))
    for _ in range(2):
        logits, own = sk.extend(params, cfg, None, q, lengths, context=ctx)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(plain_logits), atol=1e-5)
        step = sk.decode_step(params, cfg, q[:, 0], own, context=ctx)
        for x, y in zip(jax.tree.leaves((own, step)), jax.tree.leaves((plain, plain_step))):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    # once per query count (the step's 3 rows of one query, the extend's 3 rows of a chunk), then remembered
    queries = sorted(c["queries"] for c in computed)
    assert len(queries) == 2 and queries[0] == 3 and queries[1] % 3 == 0 and queries[1] > 3


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("slots, occupied, rows", [(32768, 32768, 4), (32768, 20000, 64), (1024, 1024, 64),
                                                   (4096, 300, 1)])
def test_split_flash_equals_the_jnp_path_on_gpu(slots, occupied, rows):
    from snapkv_jax.models import slot_attention
    rng = np.random.default_rng(slots + rows)
    heads, kv_heads, d = 32, 8, 128
    bf = jnp.bfloat16
    q = jnp.asarray(rng.normal(size=(rows, 1, heads, d)), bf)
    ctx_pos = np.where(np.arange(slots) < occupied, np.arange(slots), -1).astype(np.int32)
    ctx = slot_attention.SlotPart(jnp.asarray(rng.normal(size=(1, kv_heads, slots, d)), bf),
                                  jnp.asarray(rng.normal(size=(1, kv_heads, slots, d)), bf),
                                  jnp.broadcast_to(jnp.asarray(ctx_pos), (1, kv_heads, slots)), shared=True)
    mine = slot_attention.SlotPart(jnp.asarray(rng.normal(size=(rows, kv_heads, 8, d)), bf),
                                   jnp.asarray(rng.normal(size=(rows, kv_heads, 8, d)), bf),
                                   jnp.broadcast_to(jnp.arange(slots, slots + 8, dtype=jnp.int32), (rows, kv_heads, 8)))
    query_pos = jnp.full((rows, 1), slots + 8, jnp.int32)
    run = jax.jit(slot_attention.attend_slots, static_argnums=3)
    plain = run(q, query_pos, (mine, ctx), None).astype(jnp.float32)
    flash = run(q, query_pos, (mine, ctx.replace(flash=True)), None).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(flash), np.asarray(plain), atol=2e-2)


def test_context_flash_checks_each_context_once(monkeypatch):
    """context_flash's slot check waits for the device, so its answer is remembered per context: asked
    again about the same context it does not check again; a different context (here Ada-KV's per-head
    holes, which cuDNN cannot take) is checked and gets its own answer."""
    generate = importlib.import_module("snapkv_jax.generate")   # the module: the package exports a function
    monkeypatch.setattr(generate, "resolve_implementation", lambda implementation, dtype: "cudnn")
    checks = []
    check = generate._occupied_prefixes
    monkeypatch.setattr(generate, "_occupied_prefixes", lambda pos: checks.append(len(pos)) or check(pos))
    cfg = CONFIGS["gqa"]
    params = sk.init_params(cfg, jax.random.key(0))
    prompt = _tokens(cfg, 1, 60, 2)
    _, prefix = sk.prefill(params, cfg, prompt, compress=CONTEXTS["snapkv"])
    _, holes = sk.prefill(params, cfg, prompt, compress=sk.AdaKV(window=4, capacity=16, kernel=3))
    assert [generate.context_flash(params, cfg, prefix) for _ in range(3)] == [True] * 3
    assert len(checks) == 1
    assert [generate.context_flash(params, cfg, holes) for _ in range(2)] == [False] * 2
    assert len(checks) == 2
    assert generate.context_flash(params, cfg, prefix.replace(pos=holes.pos)) is False    # same pos arrays
    assert len(checks) == 2
    assert generate.context_flash(params, cfg, prefix.replace(pos=tuple(map(jnp.copy, holes.pos)))) is False
    assert len(checks) == 3


def test_a_context_s_layers_are_walked_once_and_a_changed_context_again(monkeypatch):
    """The shape check of a shared context's layers runs once per context object (it is frozen, its arrays
    immutable), so questions after the first skip it; a context rebuilt with a bad layer is a new object,
    checked and refused in one line."""
    generate = importlib.import_module("snapkv_jax.generate")
    cfg = CONFIGS["gqa"]
    params = sk.init_params(cfg, jax.random.key(0))
    _, ctx = sk.prefill(params, cfg, _tokens(cfg, 1, 20, 0))
    walks = []
    real = generate._check_cache_shapes
    monkeypatch.setattr(generate, "_check_cache_shapes", lambda c, what: walks.append(what) or real(c, what))
    for seed in (1, 2):
        sk.extend(params, cfg, None, _tokens(cfg, 2, 3, seed), context=ctx)
    assert walks == ["context"]
    bad = ctx.replace(pos=(ctx.pos[0], ctx.pos[1][:, :, :-1]) + ctx.pos[2:])
    with pytest.raises(ValueError, match=r"^context layer 1: k .* do not agree[^\n]*$"):
        sk.extend(params, cfg, None, _tokens(cfg, 2, 3, 3), context=bad)
    assert walks == ["context"] * 2


def test_rows_started_on_a_known_context_do_not_wait_for_the_device(monkeypatch):
    """The context's next position is fetched once per context: a second extend or generate that starts
    rows on it reads nothing back from the device before its work is queued (so a loop over batches of
    questions is not serialised on the host), sends only what its new cache keeps (tokens, lengths, the
    rows' lengths and context marks: the rest is remembered per shape and context, and outlives generate's
    donating decode loop) and gives the same answer as the first."""
    cfg = CONFIGS["gqa"]
    params = sk.init_params(cfg, jax.random.key(0))
    _, ctx = sk.prefill(params, cfg, _tokens(cfg, 1, 40, 0), compress=CONTEXTS["snapkv"])
    q, lengths = _tokens(cfg, 3, 6, 1), np.array([6, 2, 4], np.int32)
    first, _ = sk.extend(params, cfg, None, q, lengths, context=ctx)
    greedy = sk.generate(params, cfg, q, lengths, context=ctx, max_new_tokens=3)
    fetches, puts = [], []
    real, real_put = jax.device_get, jax.device_put
    monkeypatch.setattr(jax, "device_get", lambda x: fetches.append(x) or real(x))
    monkeypatch.setattr(jax, "device_put", lambda x, *a, **k: puts.append(len(jax.tree.leaves(x))) or real_put(x, *a, **k))
    again, own = sk.extend(params, cfg, None, q, lengths, context=ctx)
    assert puts == [1]
    repeat = sk.generate(params, cfg, q, lengths, context=ctx, max_new_tokens=3)
    assert fetches == []
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))
    np.testing.assert_array_equal(np.asarray(repeat.tokens), np.asarray(greedy.tokens))
    np.testing.assert_array_equal(np.asarray(own.next_pos), 40 + lengths)
