"""`sk.fuse_projections`: the same model with Q/K/V and gate/up each in one matrix. Every entry point takes
that layout and gives the separate layout's results (float32, to 1e-5; greedy tokens equal), on a GQA and
a sliding-window model, ragged rows, a full and a compressed cache."""

import jax
import numpy as np
import pytest

import snapkv_jax as sk
from snapkv_jax import checkpoint
from snapkv_jax.models.llama import param_shapes

CONFIGS = {
    "gqa": sk.ModelConfig.tiny(),                                   # 4 query heads over 2 KV heads
    "mha-sliding": sk.ModelConfig.tiny(num_kv_heads=4, sliding_window=9),
}
LENGTHS = np.array([30, 9, 21], np.int32)                            # ragged: the middle row is never compressed


def _tokens(cfg, rows, width, seed):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (rows, width)).astype(np.int32)


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def _same_cache(a, b):
    for layer in range(len(a.k)):
        np.testing.assert_array_equal(a.pos[layer], b.pos[layer])
        _close(a.k[layer], b.k[layer])
        _close(a.v[layer], b.v[layer])
    np.testing.assert_array_equal(a.next_pos, b.next_pos)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("compress", [None, sk.SnapKV(capacity=14, window=4, kernel=3)], ids=["full", "snapkv"])
def test_fused_params_compute_the_same_model(name, compress):
    cfg = CONFIGS[name]
    params = sk.init_params(cfg, jax.random.key(2))
    fused = sk.fuse_projections(params)
    tokens = _tokens(cfg, 3, 30, seed=1)
    _close(sk.forward(fused, cfg, tokens), sk.forward(params, cfg, tokens))
    runs = []
    for p in (params, fused):
        logits, cache = sk.prefill(p, cfg, tokens, LENGTHS, compress=compress, max_slots=40)
        step_logits, stepped = sk.decode_step(p, cfg, np.array([3, 4, 5]), cache)
        ext_logits, extended = sk.extend(p, cfg, stepped, _tokens(cfg, 3, 5, seed=2), np.array([5, 2, 1]))
        out = sk.generate(p, cfg, tokens, LENGTHS, max_new_tokens=6, compress=compress)
        runs.append((logits, cache, step_logits, stepped, ext_logits, extended, out))
    (l0, c0, s0, d0, e0, x0, g0), (l1, c1, s1, d1, e1, x1, g1) = runs
    for a, b in ((l0, l1), (s0, s1), (e0, e1)):
        _close(a, b)
    for a, b in ((c0, c1), (d0, d1), (x0, x1)):
        _same_cache(a, b)
    np.testing.assert_array_equal(g0.tokens, g1.tokens)


@pytest.mark.parametrize("kwargs", [
    dict(compress=sk.H2O(capacity=14, window=3)),                               # scored by the queries
    dict(compress=sk.KVzip(capacity=12, sinks=2, chunk=16, repeat=(3, 4), resume=(5,), suffix=(6,))),
    dict(compress=sk.SnapKV(capacity=14, window=4), decode_compress=sk.H2O(capacity=14, window=3), interval=4),
], ids=["h2o", "kvzip", "decode-compress"])
def test_fused_params_generate_the_same_tokens_with_other_methods(kwargs):
    """H2O's query scoring, KVzip's reconstruction (which reads o_proj itself) and decode-time selection."""
    cfg = CONFIGS["gqa"]
    params = sk.init_params(cfg, jax.random.key(2))
    tokens, lengths = _tokens(cfg, 2, 40, seed=4), np.array([40, 23], np.int32)
    want = sk.generate(params, cfg, tokens, lengths, max_new_tokens=10, **kwargs)
    got = sk.generate(sk.fuse_projections(params), cfg, tokens, lengths, max_new_tokens=10, **kwargs)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    _same_cache(got.cache, want.cache)


def test_fused_layout_is_what_param_shapes_says_and_frees_nothing_else():
    cfg = CONFIGS["gqa"]
    params = sk.init_params(cfg, jax.random.key(0))
    fused = sk.fuse_projections(params)
    want = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), param_shapes(cfg, fused=True))
    assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), fused) == want
    attn = fused["layers_1"]["attn"]
    assert sorted(attn) == ["o_proj", "qkv_proj"] and sorted(fused["layers_1"]["mlp"]) == ["down_proj", "gate_up_proj"]
    assert attn["o_proj"]["kernel"] is params["layers_1"]["attn"]["o_proj"]["kernel"]   # passed through
    assert "q_proj" in params["layers_1"]["attn"]                                       # the input is unchanged


def test_bad_fused_params_are_refused_in_one_line(tmp_path):
    cfg = CONFIGS["gqa"]
    fused = sk.fuse_projections(sk.init_params(cfg, jax.random.key(0)))
    prompt = np.zeros((1, 5), np.int32)
    broken = dict(fused, layers_1=dict(fused["layers_1"], attn={}))
    wider = sk.ModelConfig.tiny(intermediate_size=64)
    for call, message in [
        (lambda: sk.fuse_projections(fused), "params['layers_0'] is already fused"),
        (lambda: sk.fuse_projections([fused]), "fuse_projections takes the params dict init_params, load or "
                                               "load_hf return, got list"),
        (lambda: sk.prefill(broken, cfg, prompt), "params['layers_1'] lacks ['attn']['o_proj']['kernel']"),
        (lambda: checkpoint.save(str(tmp_path / "ckpt"), cfg, fused), "fused params (sk.fuse_projections) are not"),
        (lambda: sk.prefill(fused, wider, prompt),
         "params['layers_0']['mlp']['down_proj']['kernel'] has shape (128, 64) but this config needs (64, 64)"),
    ]:
        with pytest.raises(ValueError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (conftest forces 4 on the CPU)")
def test_fused_params_on_a_mesh_split_rows_and_sequence_but_not_the_model_axis():
    cfg = CONFIGS["gqa"]
    fused = sk.fuse_projections(sk.init_params(cfg, jax.random.key(0)))
    tokens = _tokens(cfg, 4, 12, seed=3)
    want = sk.generate(fused, cfg, tokens, max_new_tokens=4)
    for mesh in (sk.make_mesh(data=2), sk.make_mesh(data=2, seq=2)):     # seq: the ring prefill's shard_map
        got = sk.generate(fused, cfg, tokens, max_new_tokens=4, mesh=mesh)
        np.testing.assert_array_equal(got.tokens, want.tokens)
    with pytest.raises(ValueError, match=r"fused projections \(sk.fuse_projections\) cannot be split over the "
                                         r"mesh's model axis \(model=2\)"):
        sk.generate(fused, cfg, tokens, max_new_tokens=4, mesh=sk.make_mesh(model=2))
