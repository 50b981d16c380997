"""Model behaviour beyond HF parity: ragged batches, bfloat16, no recompilation, input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import snapkv_jax as sk
from snapkv_jax.generate import bucket_width

from tests.compile_log import lowered

CFG = sk.ModelConfig.tiny(num_layers=2, num_heads=6, num_kv_heads=2, vocab_size=89)
SLIDING = sk.ModelConfig.tiny(num_layers=2, sliding_window=5)


@pytest.fixture(scope="module")
def params():
    return sk.init_params(CFG, jax.random.key(0))


def right_pad(rows, width):
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    return tokens, np.array([len(r) for r in rows], np.int32)


@pytest.mark.parametrize("cfg", [CFG, SLIDING], ids=["gqa", "sliding"])
def test_ragged_batch_rows_equal_rows_alone(cfg):
    params = sk.init_params(cfg, jax.random.key(1))
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, cfg.vocab_size, n) for n in (23, 7, 1)]
    tokens, lengths = right_pad(rows, 23)
    tokens[1, 7:] = rng.integers(0, cfg.vocab_size, 16)   # padding content must not matter
    logits, cache = sk.prefill(params, cfg, tokens, lengths, max_slots=27)
    nxt = np.array([3, 4, 5])
    step_logits, _ = sk.decode_step(params, cfg, nxt, cache)
    for b, row in enumerate(rows):
        alone, alone_cache = sk.prefill(params, cfg, row[None], max_slots=len(row) + 4)
        np.testing.assert_allclose(logits[b], alone[0], atol=1e-5, rtol=0)
        alone_step, _ = sk.decode_step(params, cfg, nxt[b:b + 1], alone_cache)
        np.testing.assert_allclose(step_logits[b], alone_step[0], atol=1e-5, rtol=0)
        full = sk.forward(params, cfg, row[None])
        np.testing.assert_allclose(logits[b], full[0, -1], atol=1e-5, rtol=0)


def test_bfloat16_params_stay_close_to_float32(params):
    """bf16 weights and activations: logits within 0.1 absolute of float32 (logits here span ~±1.5;
    bf16 keeps 8 bits of mantissa, and the error compounds over 2 layers)."""
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 16))
    full32, full16 = sk.forward(params, CFG, tokens), sk.forward(p16, CFG, tokens)
    assert full16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(full16 - full32))) < 0.1
    out32 = sk.generate(params, CFG, tokens, max_new_tokens=4)
    out16 = sk.generate(p16, CFG, tokens, max_new_tokens=4)
    assert out16.cache.k[0].dtype == jnp.bfloat16
    assert out16.tokens.shape == out32.tokens.shape == (2, 4)


@pytest.mark.parametrize("placed", [False, True], ids=["jit-output", "device-put"])
def test_decode_step_does_not_recompile(params, placed):
    """Every step from the prefill's cache on reuses the first step's program, whether the params are a
    jit's output or were placed with device_put (committed arrays, as `sk.load` gives)."""
    if placed:
        params = jax.device_put(params, jax.devices()[0])
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 10))
    logits, cache = sk.prefill(params, CFG, tokens, max_slots=20)
    logits, cache = sk.decode_step(params, CFG, np.argmax(logits, -1), cache)
    with lowered("_decode_impl") as counts:
        for _ in range(5):
            logits, cache = sk.decode_step(params, CFG, np.argmax(logits, -1), cache)
    assert counts == {}


def test_donated_decode_step_matches_copying_one(params):
    tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, (1, 9))
    _, cache = sk.prefill(params, CFG, tokens, max_slots=12)
    want, _ = sk.decode_step(params, CFG, np.array([7]), cache)
    _, cache2 = sk.prefill(params, CFG, tokens, max_slots=12)
    got, _ = sk.decode_step(params, CFG, np.array([7]), cache2, donate=True)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("tokens, lengths, message", [
    (np.zeros((2, 0), np.int32), None, "empty prompt"),
    (np.zeros((2, 4), np.int32), np.array([4, 0]), r"lengths\[1\]=0"),
    (np.zeros((2, 4), np.int32), np.array([5, 2]), r"lengths\[0\]=5 exceeds the tokens width 4"),
    (np.full((1, 4), 89), None, "token id 89"),
    (np.zeros((1, 3000), np.int32), None, "max_position_embeddings=2048"),
    (np.zeros((4,), np.int32), None, "shape"),
    (np.zeros((1, 4), np.int32), np.array([2.7]), "lengths must be integers"),
    ([[1, 2, 3], [4, 5]], None, "right-pad rows of different lengths"),
])
def test_bad_prompts_raise_value_errors(params, tokens, lengths, message):
    with pytest.raises(ValueError, match=message):
        sk.prefill(params, CFG, tokens, lengths)


def test_padding_ids_outside_the_vocabulary_do_not_matter(params):
    """Padding is replaced before embedding: an out-of-vocabulary pad id would embed as NaN, and the
    full-cache decode multiplies the padding slots' (NaN) values by probability 0."""
    rows = [np.arange(1, 12), np.arange(20, 25)]
    tokens, lengths = right_pad(rows, 11)
    want = sk.generate(params, CFG, tokens, lengths, max_new_tokens=5)
    tokens[1, 5:] = CFG.vocab_size + 100
    got = sk.generate(params, CFG, tokens, lengths, max_new_tokens=5)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    logits, cache = sk.prefill(params, CFG, tokens, lengths, max_slots=12)
    step, _ = sk.decode_step(params, CFG, np.array([1, 2]), cache)
    assert np.isfinite(np.asarray(logits)).all() and np.isfinite(np.asarray(step)).all()


def test_decoding_from_an_empty_cache_equals_forward(params):
    tokens = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 6))
    cache = sk.cache.create(CFG, batch=2, slots=6)
    for t in range(6):
        logits, cache = sk.decode_step(params, CFG, tokens[:, t], cache)
        want = sk.forward(params, CFG, tokens[:, :t + 1])[:, -1]
        np.testing.assert_allclose(logits, want, atol=1e-5, rtol=0)
    assert np.asarray(sk.cache.valid_slots(cache)).min() == 6


def test_max_slots_too_small_raises(params):
    with pytest.raises(ValueError, match="max_slots=3"):
        sk.prefill(params, CFG, np.zeros((1, 5), np.int32), max_slots=3)


def test_full_cache_raises_before_writing(params):
    logits, cache = sk.prefill(params, CFG, np.zeros((1, 5), np.int32), max_slots=6)
    logits, cache = sk.decode_step(params, CFG, np.array([1]), cache)
    with pytest.raises(ValueError, match="KV cache is full"):
        sk.decode_step(params, CFG, np.array([1]), cache)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=2, top_p=0.0), "top_p"),
    (dict(max_new_tokens=2, top_k=-2), "top_k"),
    (dict(max_new_tokens=2, eos_id=1000), "eos_id=1000"),
    (dict(max_new_tokens=2050), "max_new_tokens"),
    (dict(max_new_tokens=2, compress=dict(window=4)), "snapkv_jax.SnapKV"),
    (dict(max_new_tokens=2, eos_id=2.5), "eos_id=2.5"),
    (dict(max_new_tokens=2, temperature="1"), "temperature"),
    (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(max_new_tokens=2, seed=-1), "seed"),
    (dict(max_new_tokens=2, seed=2**40), "seed"),
    (dict(max_new_tokens=2, snap_impl="cuda"), "unknown SnapKV impl 'cuda'"),
    (dict(max_new_tokens=2, implementation="foo"), "unknown attention implementation 'foo'"),
    (dict(max_new_tokens=2, seed=jax.random.key(0)), "seed must be an integer in"),
    (dict(max_new_tokens=2, interval=0), "interval must be a positive integer"),
    (dict(max_new_tokens=2, max_slots=4), "max_slots=4 bounds the growth of a given cache= or context="),
    (dict(max_new_tokens=2, bucket="no"), "bucket must be True or False, got 'no'"),  # "no" was truthy (an audit)
])
def test_bad_generate_arguments_raise(params, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        sk.generate(params, CFG, np.zeros((1, 5), np.int32), **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("cfg, message", [
    (sk.ModelConfig.tiny(num_layers=1, num_heads=6, num_kv_heads=2, vocab_size=89),   # ran 1 of 2 layers
     "params do not fit this config (1 layers): they hold 'layers_1', not in it"),
    (sk.ModelConfig.tiny(num_layers=2, num_heads=6, num_kv_heads=2, vocab_size=89, tie_word_embeddings=True),
     "they hold 'lm_head', not in it"),                                       # ignored the untied head
    (sk.ModelConfig.tiny(num_layers=3, num_heads=6, num_kv_heads=2, vocab_size=89), "they lack 'layers_2'"),
    (sk.ModelConfig.tiny(num_layers=2, num_heads=6, num_kv_heads=2, vocab_size=50),
     "params['embed']['embedding'] has shape (89, 64) but this config needs (50, 64)"),
    (sk.ModelConfig.tiny(num_layers=2, num_heads=6, num_kv_heads=2, vocab_size=89, intermediate_size=64),
     "params['layers_0']['mlp']['down_proj']['kernel'] has shape (128, 64) but this config needs (64, 64)"),
])
def test_params_of_another_config_are_refused_before_jit(params, cfg, message):
    """Before, a config with fewer layers or a tied head ran and silently computed another model, and a
    shape mismatch raised flax's ScopeParamShapeError from inside jit."""
    prompt = np.zeros((1, 5), np.int32)
    _, cache = sk.prefill(params, CFG, prompt, max_slots=8)
    for call in (lambda: sk.forward(params, cfg, prompt), lambda: sk.prefill(params, cfg, prompt),
                 lambda: sk.generate(params, cfg, prompt, max_new_tokens=2),
                 lambda: sk.generate(params, cfg, prompt[:, :2], max_new_tokens=2, cache=cache),
                 lambda: sk.extend(params, cfg, cache, prompt[:, :2]),
                 lambda: sk.decode_step(params, cfg, np.array([1]), cache)):
        with pytest.raises(ValueError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value)
    for call in (lambda: sk.prefill([params], CFG, prompt),
                 lambda: sk.generate([params], CFG, prompt[:, :2], max_new_tokens=2, cache=cache)):
        with pytest.raises(ValueError, match="params must be the dict of arrays"):
            call()


def test_bad_prefill_and_decode_arguments_raise(params):
    prompt = np.zeros((1, 5), np.int32)
    with pytest.raises(ValueError, match="max_slots must be an integer"):
        sk.prefill(params, CFG, prompt, max_slots=40.9)
    with pytest.raises(ValueError, match="unknown SnapKV impl 'cuda'"):  # even when nothing is compressed
        sk.prefill(params, CFG, prompt, compress=sk.SnapKV(window=2, capacity=8), snap_impl="cuda")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            sk.forward(params, CFG, prompt, implementation="cudnn")
    _, cache = sk.prefill(params, CFG, prompt, max_slots=8)
    with pytest.raises(ValueError, match="next_tokens must be integers"):
        sk.decode_step(params, CFG, np.array([1.5]), cache)
    with pytest.raises(ValueError, match="donate must be True or False, got 'yes'"):
        sk.decode_step(params, CFG, np.array([1]), cache, donate="yes")
    logits, _ = sk.decode_step(params, CFG, np.array([1]), cache, donate=np.bool_(False))  # NumPy's bool is one
    assert logits.shape == (1, CFG.vocab_size)


def test_numpy_integers_are_accepted_as_arguments(params):
    prompt = np.ones((1, 5), np.int32)
    want = sk.generate(params, CFG, prompt, max_new_tokens=3, temperature=0.7, top_k=5, seed=3)
    got = sk.generate(params, CFG, prompt, max_new_tokens=np.int64(3), temperature=np.float32(0.7),
                      top_k=np.int32(5), seed=np.uint32(3))
    np.testing.assert_array_equal(got.tokens, want.tokens)


def test_prompt_plus_new_tokens_may_fill_every_position(params):
    """The last generated token is never fed back: L + N - 1 positions suffice."""
    out = sk.generate(params, CFG, np.zeros((1, 2000), np.int32), max_new_tokens=49, bucket=False)
    assert out.tokens.shape == (1, 49)


@pytest.mark.parametrize("t, bucket", [(1, 32), (32, 32), (33, 48), (48, 48), (49, 64), (100, 128),
                                       (129, 192), (5000, 6144)])
def test_bucket_width(t, bucket):
    assert bucket_width(t) == bucket


def test_params_that_are_not_jax_arrays_of_one_float_dtype_are_refused(params):
    """NumPy arrays, a bfloat16 subtree among float32 ones, or a cast of one later layer failed inside jit
    (or on a missing `.sharding`) with a raw error (an audit)."""
    prompt = np.zeros((1, 5), np.int32)
    cast = lambda tree: jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), tree)
    cases = [(jax.tree_util.tree_map(np.asarray, params), "params['embed']['embedding'] is a numpy.ndarray, not a jax array"),
             (dict(params, embed=cast(params["embed"])), "params must share one floating dtype, got "),
             (dict(params, layers_1=cast(params["layers_1"])), "(params['layers_1']"),
             (jax.tree_util.tree_map(lambda x: x.astype(jnp.int32), params), "got int32")]
    for bad, message in cases:
        for call in (lambda: sk.prefill(bad, CFG, prompt), lambda: sk.generate(bad, CFG, prompt, max_new_tokens=2)):
            with pytest.raises(ValueError) as info:
                call()
            assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("key, dtype, message", [
    (0, jnp.float32, "key must be a jax.random key (e.g. jax.random.key(0)), got 0"),   # flax's InvalidRngError
    (jax.random.key(0), jnp.int32, "dtype must be a floating dtype"),                  # weights truncated to 0
])
def test_init_params_refuses_a_seed_for_a_key_and_integer_dtypes(key, dtype, message):
    with pytest.raises(ValueError) as info:
        sk.init_params(CFG, key, dtype)
    assert message in str(info.value)


@pytest.mark.parametrize("fields, message", [                      # each was accepted before (an audit):
    (dict(rope_theta=0.0), "rope_theta must be a finite number > 0, got 0.0"),          # NaN logits
    (dict(rope_theta=-1.0), "rope_theta must be a finite number > 0"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number > 0, got nan"),   # NaN logits
    (dict(rms_norm_eps=-1e-5), "rms_norm_eps must be a finite number > 0"),
    (dict(sliding_window=2.5), "sliding_window must be a positive integer or None, got 2.5"),
    (dict(sliding_window="4"), "sliding_window must be a positive integer or None, got '4'"),  # a TypeError
    (dict(num_layers=True), "num_layers must be a positive integer, got True"),
    (dict(max_position_embeddings=2**31), "must be below 2\\*\\*31 \\(positions are int32\\)"),
    (dict(eos_token_id=500), "eos_token_id must be None or a token id in \\[0, 256\\), got 500"),
    (dict(bos_token_id=-1), "bos_token_id must be None or a token id"),
    (dict(tie_word_embeddings=1), "tie_word_embeddings must be a bool, got 1"),
    (dict(rope_scaling={"rope_type": "linear"}), "rope_scaling must be a RopeScaling or None"),
])
def test_model_config_refuses_values_that_give_nan_or_another_model(fields, message):
    with pytest.raises(ValueError, match=message):
        sk.ModelConfig.tiny(vocab_size=256, **fields)


@pytest.mark.parametrize("scaling, message", [
    (dict(rope_type="yarn", factor=2.0), "rope_type must be 'llama3' or 'linear'"),   # was silently unscaled
    (dict(rope_type="linear", factor=0.0), "factor must be a finite number > 0, got 0.0"),
    (dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=4.0), "must exceed"),
    (dict(rope_type="llama3", factor=8.0, original_max_position_embeddings=0), "must be a positive integer"),
])
def test_rope_scaling_refuses_what_is_not_implemented_or_not_finite(scaling, message):
    with pytest.raises(ValueError, match=message):
        sk.RopeScaling(**scaling)


def test_model_config_takes_numpy_numbers():
    cfg = sk.ModelConfig.tiny(rope_theta=np.float32(500000.0), rms_norm_eps=np.float64(1e-6),
                              eos_token_id=np.uint32(2))
    assert cfg.rope_theta == 500000.0 and cfg.eos_token_id == 2
