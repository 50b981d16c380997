"""Layer-major chunked prefill (`snapkv_jax.layer_prefill`): the same result as an unchunked prefill for
every compression method, per-layer memory in the compiled layer program, and the refusal of a prompt
that cannot fit, before anything is traced."""

import jax
import numpy as np
import pytest

import snapkv_jax as sk
from snapkv_jax import layer_prefill, memory
from snapkv_jax.generate import plan_prefill

METHODS = [
    None,
    sk.SnapKV(window=4, capacity=14, kernel=3),
    sk.StreamingLLM(capacity=12, sinks=2),
    sk.H2O(capacity=14, window=4),
    sk.H2O(capacity=14, window=4, normalize=True, gqa_reduce="max"),
    sk.RandomKV(capacity=14, window=4, seed=5),
    sk.PyramidKV(capacity=14, window=4, beta=4),
    sk.AdaKV(capacity=14, window=4, alpha=0.25),
]
IDS = ["full", "snapkv", "streamingllm", "h2o", "h2o-normalized", "random", "pyramidkv", "adakv"]
CONFIGS = {
    "gqa": sk.ModelConfig.tiny(),                                   # 4 query heads over 2 KV heads
    "mha-sliding": sk.ModelConfig.tiny(num_kv_heads=4, sliding_window=9),
}


def _params(cfg):
    return sk.init_params(cfg, jax.random.key(2))


def _prompt(cfg, width=45):
    rng = np.random.default_rng(width)
    tokens = rng.integers(0, cfg.vocab_size, (3, width)).astype(np.int32)
    lengths = np.array([width, 13, 30], np.int32)                     # ragged: one row never compressed
    return tokens, lengths


CASES = [("gqa", method) for method in METHODS] + [("mha-sliding", method) for method in METHODS[:4]]


@pytest.mark.parametrize("cfg_name, compress", CASES,
                         ids=[f"gqa-{i}" for i in IDS] + [f"mha-sliding-{i}" for i in IDS[:4]])
def test_chunked_prefill_equals_unchunked(cfg_name, compress):
    """45 tokens in chunks of 16: three chunks, the last ragged; the sliding window (9) is shorter than a
    chunk, so its keys straddle chunk boundaries."""
    cfg = CONFIGS[cfg_name]
    params = _params(cfg)
    tokens, lengths = _prompt(cfg)
    ref_logits, ref = sk.prefill(params, cfg, tokens, lengths, compress=compress, chunk=None)
    for chunk in (16,):
        logits, cache = sk.prefill(params, cfg, tokens, lengths, compress=compress, chunk=chunk)
        np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=2e-5)
        for layer in range(cfg.num_layers):
            np.testing.assert_array_equal(cache.pos[layer], ref.pos[layer], err_msg=f"layer {layer}")
            np.testing.assert_allclose(cache.k[layer], ref.k[layer], atol=2e-5)
            np.testing.assert_allclose(cache.v[layer], ref.v[layer], atol=2e-5)
        np.testing.assert_array_equal(cache.end, ref.end)


def test_chunked_generate_equals_unchunked():
    cfg = CONFIGS["gqa"]
    tokens, lengths = _prompt(cfg)
    snap = sk.SnapKV(window=4, capacity=14)
    a = sk.generate(_params(cfg), cfg, tokens, lengths, max_new_tokens=6, compress=snap, chunk=None)
    b = sk.generate(_params(cfg), cfg, tokens, lengths, max_new_tokens=6, compress=snap, chunk=16)
    np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize("chunk, message", [(0, "chunk"), (-8, "chunk"), (2.5, "chunk"), ("big", "chunk")])
def test_bad_chunk_is_refused(chunk, message):
    cfg = CONFIGS["gqa"]
    with pytest.raises(ValueError, match=message):
        sk.prefill(_params(cfg), cfg, *_prompt(cfg), chunk=chunk)


# -------------------------------------------------------------------------------------------- memory
def _layer_memory(cfg, compress, width, chunk):
    """(temp bytes, output bytes) of the compiled layer program, and the estimator's peak."""
    params = _params(cfg)
    tokens = np.zeros((2, width), np.int32)
    lengths = np.array([width, width - 7], np.int32)
    plan = plan_prefill(params, cfg, tokens, compress, chunk, 8, "xla")
    progs = layer_prefill.programs(params, cfg, tokens, lengths, plan=plan, compress=compress, impl="xla",
                                   attention="xla", ahead_of_time=True)
    stats = progs.layer.memory_analysis()
    estimate = layer_prefill.estimate_peak(cfg, plan, 2, 4, compress, "xla")
    return stats.temp_size_in_bytes, stats.output_size_in_bytes, estimate


@pytest.mark.parametrize("compress", METHODS[1:], ids=IDS[1:])
def test_compression_is_per_layer_in_compiled_memory(compress):
    """Per-layer compression (SnapKV, arXiv 2404.14469 section 4.3): one compiled program per layer, so
    going from 2 to 8 layers grows its temporary memory by at most one layer's full K/V (in fact not at
    all), its output is one layer's compressed cache plus the hidden states, and the estimator that
    `prefill` checks against free memory covers what the compiler allocates."""
    width, chunk = 96, 32
    small, big = sk.ModelConfig.tiny(num_layers=2), sk.ModelConfig.tiny(num_layers=8)
    temp2, _, _ = _layer_memory(small, compress, width, chunk)
    temp8, out8, estimate8 = _layer_memory(big, compress, width, chunk)
    one_layer_kv = 2 * 2 * big.num_kv_heads * width * big.head_dim * 4                 # [2, K, T, D] x 2
    assert temp8 - temp2 <= one_layer_kv, f"temp grew by {temp8 - temp2}, one layer's K/V {one_layer_kv}"
    hidden = 2 * width * big.hidden_size * 4
    widest = compress.max_slots(big.num_layers) + 8
    compressed = 2 * big.num_kv_heads * widest * (2 * big.head_dim * 4 + 4)
    assert out8 <= hidden + compressed + 4 * 64                 # four buffers, each padded to 64 bytes
    # H2O's running scores need query blocks of [B, H, c, T] float32 (a few of them alive at once).
    blocks = 3 * 2 * big.num_heads * chunk * width * 4 if compress.needs_query_scores else 0
    assert temp8 < big.num_layers * one_layer_kv + blocks, "the layer program holds every layer's K/V"
    assert estimate8 >= temp8 + out8, f"estimate {estimate8} below compiled {temp8 + out8}"


def test_a_prompt_that_cannot_fit_is_refused_in_one_line(monkeypatch):
    """With a forced 1 MiB budget, a 512-token prefill is refused before tracing, naming the estimate,
    the free memory and the longest prompt that would fit; that prompt then runs."""
    cfg = sk.ModelConfig.tiny(hidden_size=256, intermediate_size=512)
    params = _params(cfg)
    monkeypatch.setenv(memory.BUDGET_ENV, "1MiB")
    tokens = np.zeros((1, 512), np.int32)
    with pytest.raises(ValueError) as info:
        sk.prefill(params, cfg, tokens, compress=sk.SnapKV(window=4, capacity=32), chunk=64)
    message = str(info.value)
    assert "\n" not in message and "but 1.00 MiB are free" in message
    need = message.split("needs about ")[1].split(" besides")[0]
    assert need.endswith("MiB") and float(need.split()[0]) > 1
    longest = int(message.split("longest prompt that fits is about ")[1].split()[0])
    assert 0 < longest < 512
    sk.prefill(params, cfg, np.zeros((1, longest), np.int32), compress=sk.SnapKV(window=4, capacity=32),
               chunk=64)
    # Room reserved after the prompt that no prompt could leave: the message names it, not the prompt.
    with pytest.raises(ValueError, match=r"the 1000000 empty slots reserved after the prompt \(max_slots") as info:
        sk.prefill(params, cfg, np.zeros((1, 8), np.int32), max_slots=1000008)
    assert "\n" not in str(info.value)


def test_auto_chunk_halves_to_fit_the_budget(monkeypatch):
    cfg = sk.ModelConfig.tiny(hidden_size=256, intermediate_size=512, max_position_embeddings=65536)
    params = _params(cfg)
    tokens = np.zeros((1, 32768), np.int32)
    # "Unlimited": a budget set, so the host's free memory (what auto reads on the CPU, which other
    # processes change) cannot halve the chunk here
    monkeypatch.setenv(memory.BUDGET_ENV, str(2**40))
    unlimited = plan_prefill(params, cfg, tokens, None, "auto", 0, "xla")
    assert unlimited.chunk == 4096                                   # width / 8
    monkeypatch.setenv(memory.BUDGET_ENV, str(memory.prefill_peak_bytes(
        cfg, batch=1, width=32768, chunk=1024, cache_slots=2 * 32768, itemsize=4, flash=False) + 2**20))
    tight = plan_prefill(params, cfg, tokens, None, "auto", 0, "xla")
    assert tight.chunk < 4096
    assert tight.padded % tight.chunk == 0


def test_the_longest_prompt_named_for_chunk_auto_fits_under_chunk_auto(monkeypatch):
    """A refused chunk="auto" prefill names the longest prompt that fits at the chunk auto chose (512);
    that prompt, 4K tokens or fewer, then ran unchunked under "auto" and was refused again (at 300 MiB for
    SmolLM2's shape on the jnp path: 8192 tokens -> "about 2560 tokens", which needed 899 MiB unchunked)."""
    cfg = sk.ModelConfig.tiny(hidden_size=256, intermediate_size=512, max_position_embeddings=65536)
    params = _params(cfg)
    budget = memory.prefill_peak_bytes(cfg, batch=1, width=3072, chunk=512, cache_slots=2 * 3072, itemsize=4,
                                       flash=False)
    assert budget < memory.prefill_peak_bytes(cfg, batch=1, width=3072, chunk=None, cache_slots=2 * 3072,
                                              itemsize=4, flash=False)
    monkeypatch.setenv(memory.BUDGET_ENV, str(budget))
    with pytest.raises(ValueError, match="at chunk=512 the longest prompt that fits is about") as info:
        plan_prefill(params, cfg, np.zeros((1, 8192), np.int32), None, "auto", 0, "xla")
    longest = int(str(info.value).split("longest prompt that fits is about ")[1].split()[0])
    assert 512 < longest <= 4096
    plan = plan_prefill(params, cfg, np.zeros((1, longest), np.int32), None, "auto", 0, "xla")
    assert plan.chunk < longest
    # a prompt whose unchunked prefill fits is still prefilled in one piece
    assert plan_prefill(params, cfg, np.zeros((1, 512), np.int32), None, "auto", 0, "xla").chunk == 512
