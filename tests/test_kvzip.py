"""KVzip (arXiv 2505.23416) in layer-major prefill against its definition computed the slow way.

The oracle is a float64 NumPy Llama sharing no code with the library: for each row and each context chunk
it runs the whole model causally over [context, that chunk's reconstruction prompt], reads each layer's
queries and keys, scores the chunk's context keys as the module docstring of compression/kvzip.py
defines (softmax over sinks, the chunk's keys and the reconstruction's own causal keys; max over the
reconstruction's queries and the KV group's query heads; KVzip+ weights), and keeps the sinks and the
top capacity - sinks. Prefill must keep the same sets (a differing set only as another valid top-k under
ties), and a decode step on its cache must give the logits the oracle computes over the kept K/V.
"""

import math

import jax
import numpy as np
import pytest

import snapkv_jax as sk
from snapkv_jax.compression import select
from tests.test_snapkv_select import is_valid_top_k

CHUNK, REPEAT, RESUME, SUFFIX, OVERLAP = 16, (5, 6, 7), (8, 9), (10,), 3


# -------------------------------------------------------------------------------- float64 NumPy oracle
def _np(params):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)


def _rms(x, scale, eps):
    return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rope(x, positions, theta):
    """x `[T, N, D]` rotated split-half by `positions [T]`."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.concatenate([positions[:, None] * inv] * 2, axis=-1)[:, None, :]   # [T, 1, D]
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
    return x * np.cos(ang) + rot * np.sin(ang)


def oracle_forward(p, cfg, ids):
    """Causal pass over `ids [T]` -> per layer (q `[H, T, D]`, k, v `[K, T, D]`, attention input
    `[T, Dm]`), and the final hidden states `[T, Dm]`."""
    t, h, kv, d = len(ids), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = p["embed"]["embedding"][np.asarray(ids)]
    pos = np.arange(t, dtype=np.float64)
    per_layer = []
    for layer in range(cfg.num_layers):
        lp = p[f"layers_{layer}"]
        a = lp["attn"]
        hin = _rms(x, lp["attn_norm"]["scale"], cfg.rms_norm_eps)
        q = _rope((hin @ a["q_proj"]["kernel"]).reshape(t, h, d), pos, cfg.rope_theta).transpose(1, 0, 2)
        k = _rope((hin @ a["k_proj"]["kernel"]).reshape(t, kv, d), pos, cfg.rope_theta).transpose(1, 0, 2)
        v = (hin @ a["v_proj"]["kernel"]).reshape(t, kv, d).transpose(1, 0, 2)
        out = np.zeros((t, h, d))
        for head in range(h):
            g = head // (h // kv)
            logits = q[head] @ k[g].T / math.sqrt(d)
            visible = np.tril(np.ones((t, t), bool))
            if cfg.sliding_window is not None:  # query i sees keys j > i - W
                visible &= np.arange(t)[None, :] > np.arange(t)[:, None] - cfg.sliding_window
            logits = np.where(visible, logits, -np.inf)
            w = np.exp(logits - logits.max(-1, keepdims=True))
            out[:, head] = (w / w.sum(-1, keepdims=True)) @ v[g]
        x = x + out.reshape(t, -1) @ a["o_proj"]["kernel"]
        m = lp["mlp"]
        hm = _rms(x, lp["mlp_norm"]["scale"], cfg.rms_norm_eps)
        gate = hm @ m["gate_proj"]["kernel"]
        x = x + (gate / (1 + np.exp(-gate)) * (hm @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
        per_layer.append((q, k, v, hin))
    return per_layer, x


def oracle_kept(p, cfg, ctx, method):
    """Per layer, `[K]` lists of kept position sets and the float64 scores `[K, L]` of one row."""
    length, chunk = len(ctx), method.chunk
    layers, _ = oracle_forward(p, cfg, ctx)
    h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    scores = np.zeros((cfg.num_layers, kv, length))
    for i, start in enumerate(range(0, length, chunk)):
        prompt = (list(method.repeat) if i == 0 else
                  list(method.resume) + list(ctx[start - method.overlap:start])) + list(method.suffix)
        part = list(ctx[start:start + chunk])
        recon = prompt + part
        per_layer, _ = oracle_forward(p, cfg, list(ctx) + recon)
        sinks = min(method.sinks, start)
        for layer, (q, k, v, hin) in enumerate(per_layer):
            wo = p[f"layers_{layer}"]["attn"]["o_proj"]["kernel"].reshape(h, d, -1)
            for head in range(h):
                g = head // (h // kv)
                chunk_keys = list(range(start, start + len(part)))
                for r in range(len(recon)):
                    own = list(range(length, length + r + 1))
                    keys = list(range(sinks)) + chunk_keys + own
                    logits = k[g, keys] @ q[head, length + r] / math.sqrt(d)
                    w = np.exp(logits - logits.max())
                    prob = (w / w.sum())[sinks:sinks + len(part)]
                    if method.normalize:
                        value_norm = np.linalg.norm(v[g, chunk_keys] @ wo[head], axis=-1)
                        prob = prob * value_norm / np.linalg.norm(hin[length + r])
                    scores[layer, g, start:start + len(part)] = np.maximum(
                        scores[layer, g, start:start + len(part)], prob)
    kept = []
    for layer in range(cfg.num_layers):
        heads = []
        for g in range(kv):
            if length <= method.capacity:
                heads.append(set(range(length)))
                continue
            rest = np.argsort(-scores[layer, g, method.sinks:], kind="stable")[:method.capacity - method.sinks]
            heads.append(set(range(method.sinks)) | set((rest + method.sinks).tolist()))
        kept.append(heads)
    return kept, scores, layers


def oracle_next_logits(p, cfg, ctx_layers, kept, token, position):
    """Logits `[V]` of `token` at `position` attending to the kept context K/V of each layer and itself."""
    h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = p["embed"]["embedding"][token]
    for layer in range(cfg.num_layers):
        lp, (_, k_ctx, v_ctx, _) = p[f"layers_{layer}"], ctx_layers[layer]
        a = lp["attn"]
        hin = _rms(x, lp["attn_norm"]["scale"], cfg.rms_norm_eps)
        pos = np.array([float(position)])
        q = _rope((hin @ a["q_proj"]["kernel"]).reshape(1, h, d), pos, cfg.rope_theta)[0]
        k = _rope((hin @ a["k_proj"]["kernel"]).reshape(1, kv, d), pos, cfg.rope_theta)[0]
        v = (hin @ a["v_proj"]["kernel"]).reshape(kv, d)
        out = np.zeros((h, d))
        for head in range(h):
            g = head // (h // kv)
            idx = sorted(j for j in kept[layer][g]
                         if cfg.sliding_window is None or j > position - cfg.sliding_window)
            keys, values = np.vstack([k_ctx[g, idx], k[g]]), np.vstack([v_ctx[g, idx], v[g]])
            logits = keys @ q[head] / math.sqrt(d)
            w = np.exp(logits - logits.max())
            out[head] = (w / w.sum()) @ values
        x = x + out.reshape(-1) @ a["o_proj"]["kernel"]
        m = lp["mlp"]
        hm = _rms(x, lp["mlp_norm"]["scale"], cfg.rms_norm_eps)
        gate = hm @ m["gate_proj"]["kernel"]
        x = x + (gate / (1 + np.exp(-gate)) * (hm @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
    x = _rms(x, p["final_norm"]["scale"], cfg.rms_norm_eps)
    head_w = p["embed"]["embedding"].T if cfg.tie_word_embeddings else p["lm_head"]["kernel"]
    return x @ head_w


# ------------------------------------------------------------------------------------------------ tests
def with_random_norm_scales(params):
    """Norm scales in [0.5, 1.5]: with unit scales every RMSNorm output has norm sqrt(Dm), and KVzip+'s
    division by the attention input's norm would change nothing."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(7)
    out = [rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32) if "norm" in jax.tree_util.keystr(path) else leaf
           for path, leaf in leaves]
    return jax.tree_util.tree_unflatten(tree, [jax.numpy.asarray(x) for x in out])


def method(**knobs):
    return sk.KVzip(**{**dict(capacity=12, sinks=2, chunk=CHUNK, repeat=REPEAT, resume=RESUME, suffix=SUFFIX,
                              overlap=OVERLAP), **knobs})


@pytest.mark.parametrize("kv_heads, normalize, prefill_chunk, window", [
    (2, False, None, None),  # GQA 4/2, the layer in one piece
    (1, True, 8, None),      # GQA 4/1, KVzip+, prefill chunks (8) inside KVzip's chunks (16)
    (2, False, 8, 20),       # a sliding window (Mistral): it bounds the reconstruction's attention
])
def test_layer_major_kvzip_equals_the_whole_model_reconstruction(kv_heads, normalize, prefill_chunk, window):
    """Ragged rows: 41 tokens (chunks 0..2, the last one token), 30 (a chunk boundary inside it), 16
    (exactly one chunk), 9 (within the capacity: untouched)."""
    cfg = sk.ModelConfig.tiny(num_kv_heads=kv_heads, sliding_window=window)
    params = with_random_norm_scales(sk.init_params(cfg, jax.random.key(kv_heads)))
    kvzip = method(normalize=normalize)
    lengths = np.array([41, 30, 16, 9], np.int32)
    rng = np.random.default_rng(kv_heads)
    tokens = rng.integers(0, cfg.vocab_size, (len(lengths), 41)).astype(np.int32)
    _, cache = sk.prefill(params, cfg, tokens, lengths, compress=kvzip, chunk=prefill_chunk, max_slots=13)
    nxt = rng.integers(0, cfg.vocab_size, len(lengths)).astype(np.int32)
    logits, _ = sk.decode_step(params, cfg, nxt, cache)
    p = _np(params)
    for b, length in enumerate(lengths):
        kept, scores, ctx_layers = oracle_kept(p, cfg, tokens[b, :length], kvzip)
        for layer in range(cfg.num_layers):
            pos = np.asarray(cache.pos[layer][b])                                 # [K, S]
            for g in range(kv_heads):
                got = set(pos[g][pos[g] >= 0].tolist())
                want = kept[layer][g]
                if got != want:  # a tie: accept another valid top-k of the non-sink positions
                    rest = scores[layer, g, kvzip.sinks:length]
                    assert set(range(kvzip.sinks)) <= got, f"row {b} layer {layer} head {g} dropped a sink"
                    assert is_valid_top_k(rest, {j - kvzip.sinks for j in got - set(range(kvzip.sinks))},
                                          kvzip.capacity - kvzip.sinks), (b, layer, g, got, want)
                    kept[layer][g] = got
        want = oracle_next_logits(p, cfg, ctx_layers, kept, int(nxt[b]), int(length))
        np.testing.assert_allclose(np.asarray(logits[b]), want, rtol=1e-5, atol=1e-5)


def oracle_global(scores, length, m, num_layers):
    """The paper's global budget under a per-(layer, head) cap: per row, the L * K * capacity best
    (layer, head, position) triples, sinks first, taken greedily, skipping heads at the cap."""
    kv = scores.shape[1]
    if length <= m.capacity:
        return [[set(range(length)) for _ in range(kv)] for _ in range(num_layers)]
    triples = sorted(((np.inf if j < m.sinks else scores[l, g, j], l, g, j) for l in range(num_layers)
                      for g in range(kv) for j in range(length)), key=lambda x: -x[0])
    kept = [[set() for _ in range(kv)] for _ in range(num_layers)]
    left = num_layers * kv * m.capacity
    for _, l, g, j in triples:
        if left == 0:
            break
        if len(kept[l][g]) < m.cap:
            kept[l][g].add(j)
            left -= 1
    return kept


@pytest.mark.parametrize("max_per_head", [None, 14])
def test_global_budget_is_the_capped_global_top_k(max_per_head):
    """budget="global": the kept (layer, head, position) triples of each row are the oracle's; a cap of
    14 slots binds (some layer-head would take more)."""
    cfg = sk.ModelConfig.tiny()
    params = with_random_norm_scales(sk.init_params(cfg, jax.random.key(3)))
    kvzip = method(budget="global", max_per_head=max_per_head)
    lengths = np.array([41, 30, 9], np.int32)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (3, 41)).astype(np.int32)
    _, cache = sk.prefill(params, cfg, tokens, lengths, compress=kvzip, chunk=None)
    assert all(p.shape[2] == kvzip.cap for p in cache.pos)
    p = _np(params)
    uneven = False
    for b, length in enumerate(lengths):
        _, scores, _ = oracle_kept(p, cfg, tokens[b, :length], kvzip)
        want = oracle_global(scores, length, kvzip, cfg.num_layers)
        got = [[set(np.asarray(cache.pos[l][b, g])[np.asarray(cache.pos[l][b, g]) >= 0].tolist())
                for g in range(cfg.num_kv_heads)] for l in range(cfg.num_layers)]
        for l in range(cfg.num_layers):
            for g in range(cfg.num_kv_heads):
                live = np.asarray(cache.pos[l][b, g])
                n = len(got[l][g])
                assert (live[n:] == -1).all() and (np.diff(live[:n]) > 0).all(), "kept first, ascending"
                uneven |= length > kvzip.capacity and n != kvzip.capacity
        if got != want:  # ties: the same count, within the caps, and no less total score
            ranked = np.where(np.arange(length) < kvzip.sinks, 2.0, scores[..., :length])
            total = lambda sets: sum(ranked[l, g, sorted(s)].sum() for l, ls in enumerate(sets) for g, s in enumerate(ls))
            assert sum(len(s) for ls in got for s in ls) == sum(len(s) for ls in want for s in ls)
            assert max(len(s) for ls in got for s in ls) <= kvzip.cap
            assert total(got) >= total(want) - 1e-5, (b, got, want)
    assert uneven, "the global budget gave every layer-head the same share"


def test_prefill_logits_are_the_uncompressed_ones():
    """The reconstruction only reads the context's buffers: the prompt's own pass is unchanged."""
    cfg = sk.ModelConfig.tiny()
    params = sk.init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 41)).astype(np.int32)
    full, _ = sk.prefill(params, cfg, tokens, [41, 30], chunk=None)
    got, _ = sk.prefill(params, cfg, tokens, [41, 30], compress=method(), chunk=None)
    # Two compiled programs: on a GPU their fusions may differ in the last bit (H200: 8.9e-8); a
    # reconstruction leaking into the prompt's pass would move the logits by orders more.
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=0, atol=1e-6)


def test_from_tokenizer_spells_the_papers_instructions():
    class Words:  # a stand-in tokenizer: one id per character
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    m = sk.KVzip.from_tokenizer(Words(), capacity=64, chunk=128)
    assert "".join(map(chr, m.repeat)) == "\n\nRepeat the previous context exactly."
    assert "".join(map(chr, m.resume)) == "\n\nRepeat the part of the previous context exactly, starting with"
    assert m.suffix == (ord("\n"),) and m.capacity == 64 and m.chunk == 128


@pytest.mark.parametrize("make, message", [
    (lambda: method(capacity=2), "capacity=2 must be greater than sinks=2"),
    (lambda: method(chunk=2, overlap=3), "chunk=2 must be at least sinks=2 and overlap=3"),
    (lambda: method(normalize=1), "normalize must be True or False"),
    (lambda: method(repeat=None), "needs the token ids of its reconstruction prompt"),
    (lambda: method(resume=(1, -2)), "resume must be non-negative token ids, got -2"),
    (lambda: method(repeat=5), "repeat must be a sequence of token ids, got 5"),
    (lambda: method(chunk=16.0), "chunk must be an integer"),
    (lambda: method(budget="heads"), "unknown KVzip budget 'heads'"),
    (lambda: method(max_per_head=20), "max_per_head=20 applies to budget='global' only"),
    (lambda: method(budget="global", max_per_head=8), "max_per_head=8 is below capacity=12"),
])
def test_bad_knobs_raise_one_line_value_errors(make, message):
    with pytest.raises(ValueError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_prompt_ids_outside_the_vocabulary_and_select_without_reconstruction_are_refused():
    cfg = sk.ModelConfig.tiny()
    params = sk.init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="repeat token id 500 is outside the vocabulary"):
        sk.prefill(params, cfg, np.zeros((1, 40), np.int32), compress=method(repeat=(1, 500)))
    q = np.zeros((1, 4, 40, 16), np.float32)
    with pytest.raises(ValueError, match="come from the model's reconstruction"):
        select(method(), q, q[:, :2], np.array([40], np.int32))


def test_a_reconstruction_past_max_position_embeddings_is_refused():
    """The reconstruction runs at positions after the prompt (the paper's "repeat the previous context"):
    it must stay within the model's positions, as every other token does."""
    kvzip = method()
    longest = kvzip.positions(30)
    assert longest == 30 + kvzip.prompt_length(False) + kvzip.chunk        # two chunks: the later's prompt
    cfg = sk.ModelConfig.tiny(max_position_embeddings=longest - 1)          # the prompt alone fits
    params = sk.init_params(cfg, jax.random.key(0))
    for run in (lambda: sk.prefill(params, cfg, np.zeros((1, 30), np.int32), compress=kvzip),
                lambda: sk.generate(params, cfg, np.zeros((1, 30), np.int32), compress=kvzip, max_new_tokens=2)):
        with pytest.raises(ValueError, match=f"the prompt and its KVzip reconstruction needs {longest} positions"):
            run()
    sk.prefill(params, sk.ModelConfig.tiny(max_position_embeddings=longest), np.zeros((1, 30), np.int32),
               compress=kvzip)
