"""Parity with HF transformers (PyTorch, float32, eager attention) on tiny random models.

Acceptance 1 of the foundation issue: `forward` logits within 1e-4, and prefill + 16 greedy decode
steps give HF `generate(do_sample=False)`'s tokens with logits within 1e-4.
"""

import numpy as np
import pytest
import torch

import snapkv_jax as sk
from tests import hf_models

TOL = 1e-4
NEW_TOKENS = 16


@pytest.fixture(scope="module", params=sorted(hf_models.CASES))
def case(request, tmp_path_factory):
    model = hf_models.build(request.param)
    directory = hf_models.save(model, tmp_path_factory.mktemp(request.param))
    cfg, params = sk.load_hf(directory)
    return request.param, model, cfg, params


def test_config_reads_the_case(case):
    name, model, cfg, _ = case
    assert cfg.num_heads == model.config.num_attention_heads
    assert cfg.num_kv_heads == model.config.num_key_value_heads
    assert cfg.tie_word_embeddings == bool(model.config.tie_word_embeddings)
    assert (cfg.sliding_window is not None) == (name == "mistral_sliding")
    assert (cfg.rope_scaling is not None) == (name == "llama_rope_llama3")


def test_forward_logits_match_hf(case):
    _, model, cfg, params = case
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(sk.forward(params, cfg, tokens))
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_greedy_decode_matches_hf_generate(case):
    _, model, cfg, params = case
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        hf = model.generate(torch.tensor(prompt), do_sample=False, max_new_tokens=NEW_TOKENS,
                            min_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True)
    want_tokens = hf.sequences[0, prompt.shape[1]:].numpy()
    want_logits = np.stack([x[0].numpy() for x in hf.logits])              # [N, V]

    logits, cache = sk.prefill(params, cfg, prompt, max_slots=prompt.shape[1] + NEW_TOKENS)
    got_tokens, got_logits = [], []
    for _ in range(NEW_TOKENS):
        got_logits.append(np.asarray(logits[0]))
        token = int(np.argmax(logits[0]))
        got_tokens.append(token)
        logits, cache = sk.decode_step(params, cfg, np.array([token]), cache)
    np.testing.assert_array_equal(np.array(got_tokens), want_tokens)
    np.testing.assert_allclose(np.stack(got_logits), want_logits, atol=TOL, rtol=0)


def test_generate_matches_hf_generate(case):
    _, model, cfg, params = case
    prompt = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 13))
    with torch.no_grad():
        hf = model.generate(torch.tensor(prompt), do_sample=False, max_new_tokens=NEW_TOKENS,
                            min_new_tokens=NEW_TOKENS)
    out = sk.generate(params, cfg, prompt, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), hf[0, prompt.shape[1]:].numpy())
    assert int(out.lengths[0]) == NEW_TOKENS


LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)


@pytest.mark.parametrize("model_type, fields", [
    ("mistral", {}),                                               # no sliding_window, no max positions
    ("llama", {}),
    ("llama", dict(rope_scaling=LLAMA3 | dict(original_max_position_embeddings=16),
                   original_max_position_embeddings=64, max_position_embeddings=256)),   # top level first
    ("llama", dict(rope_scaling=LLAMA3, max_position_embeddings=256)),                   # none: max positions
    ("llama", dict(rope_scaling=dict(type="linear", factor=2.0, rope_theta=50.0), rope_theta=10000.0)),
    ("llama", dict(rope_scaling=dict(type="linear", factor=2.0),
                   rope_parameters=dict(rope_type="default", rope_theta=5e5))),         # rope_scaling wins
    ("mistral", dict(attention_bias=True, sliding_window=None)),   # Mistral has no biases; HF ignores it
    ("llama", dict(hidden_act="swish")),
], ids=["mistral_defaults", "llama_defaults", "llama3_top_level_original", "llama3_no_original",
        "theta_inside_rope_scaling", "rope_scaling_and_rope_parameters", "mistral_attention_bias", "swish"])
def test_config_fields_read_as_transformers_reads_them(tmp_path, model_type, fields):
    """Where config.json leaves a field out or states it twice, `from_hf` takes the value transformers'
    own model takes (built from AutoConfig of the same file): Mistral's 4096-token window and both models' max
    positions when absent, the rope dicts' precedence, llama3's original context length. Each of these
    was read otherwise (an audit: logits 0.02-0.87 from HF's), or refused where HF runs."""
    import json

    import transformers
    config = dict(model_type=model_type, vocab_size=101, hidden_size=48, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  architectures=["MistralForCausalLM" if model_type == "mistral" else "LlamaForCausalLM"]) | fields
    (tmp_path / "config.json").write_text(json.dumps(config))
    # the model's config: building the model settles the rope dict again (llama3's original length from
    # the top level only then; the AutoConfig alone still shows the dict's)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path)).config
    ours = sk.ModelConfig.from_hf(tmp_path)
    assert ours.max_position_embeddings == hf.max_position_embeddings
    assert ours.sliding_window == (hf.sliding_window if model_type == "mistral" else None)
    rope = hf.rope_parameters
    assert ours.rope_theta == rope["rope_theta"]
    assert (ours.rope_scaling.rope_type if ours.rope_scaling else "default") == rope["rope_type"]
    if ours.rope_scaling is not None:
        assert ours.rope_scaling.factor == rope["factor"]
    if rope["rope_type"] == "llama3":
        assert ours.rope_scaling.original_max_position_embeddings == rope["original_max_position_embeddings"]


@pytest.mark.parametrize("same_head", [False, True])
def test_a_tied_config_over_its_own_lm_head_loads_as_transformers_loads_it(tmp_path, same_head):
    """config.json ties the embeddings but the safetensors also hold lm_head.weight: transformers uses
    that head when it differs from the embedding (with a warning), and ties when it is the same. The
    loader dropped the file's head, which moved logits by 3.6 (an audit); now it unties with a warning,
    and the logits match HF's either way."""
    import json
    import warnings

    model = hf_models.build("llama_gqa")
    if same_head:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    directory = hf_models.save(model, tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"tie_word_embeddings": True}))
    hf = type(model).from_pretrained(directory).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg, params = sk.load_hf(directory)
    untied = [w for w in caught if "loading them untied" in str(w.message)]
    assert cfg.tie_word_embeddings == same_head and len(untied) == (0 if same_head else 1)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(sk.forward(params, cfg, tokens)), want, atol=TOL, rtol=0)
