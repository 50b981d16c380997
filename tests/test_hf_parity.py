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
