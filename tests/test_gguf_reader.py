"""GGUF reading: llama.cpp's layout (permuted q/k, reversed dims, quantized blocks) back to our params.

The oracle is the HF path: a tiny random HF Llama, saved as safetensors and also written as a GGUF in
llama.cpp's layout by `tests/helpers_convert.py`, must convert to the same params (exactly for F32
tensors; for Q8_0 tensors, exactly gguf's own quantize -> dequantize round trip of the HF weights).
"""

import gguf
import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from hypothesis import given
from hypothesis import strategies as st

from conversion import gguf_reader
from conversion.cli import main
from snapkv_jax import checkpoint
from snapkv_jax.config import ModelConfig, RopeScaling
from tests import helpers_convert as hc
from tests import hf_models


@given(n_heads=st.integers(1, 6), half=st.integers(1, 8), cols=st.integers(1, 5))
def test_unpermute_inverts_llama_cpp_permutation(n_heads, half, cols):
    w = np.arange(n_heads * 2 * half * cols, dtype=np.float32).reshape(n_heads * 2 * half, cols)
    permuted = hc.permute_rope_rows(w, n_heads)
    np.testing.assert_array_equal(gguf_reader.unpermute_rope_rows(permuted, n_heads), w)


def _q8_blocks_in(name: str) -> bool:
    """The tensors the mixed GGUF stores as Q8_0: the embedding and all of layer 1's projections."""
    return name == "token_embd.weight" or (name.startswith("blk.1.") and not name.endswith("norm.weight"))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_tiny_gguf_converts_to_the_hf_params(tmp_path, tie):
    model = hc.tiny_hf_model(seed=1, tie=tie)
    hf_dir = hf_models.save(model, tmp_path / "hf")
    gguf_file = hc.write_llama_gguf(tmp_path / "tiny.gguf", model,
                                    qtype=lambda n: Q.Q8_0 if _q8_blocks_in(n) else Q.F32)
    assert main(["--hf", hf_dir, str(tmp_path / "from_hf")]) == 0
    assert main(["--gguf", gguf_file, str(tmp_path / "from_gguf")]) == 0
    cfg_hf, params_hf, _ = checkpoint.load(str(tmp_path / "from_hf"))
    cfg_gguf, params_gguf, tok = checkpoint.load(str(tmp_path / "from_gguf"))

    assert cfg_gguf == cfg_hf
    assert cfg_gguf.tie_word_embeddings is tie
    assert tok is None  # the tiny GGUF carries no tokenizer metadata
    assert jax.tree_util.tree_structure(params_gguf) == jax.tree_util.tree_structure(params_hf)
    for hf_name, w in hc.hf_tensors(model).items():
        ours = hc.params_leaf(params_gguf, hf_name)
        if not _q8_blocks_in(hc.gguf_name(hf_name)):
            np.testing.assert_array_equal(ours, hc.params_leaf(params_hf, hf_name), err_msg=hf_name)
            continue
        # Q8_0 quantizes each row in blocks; llama.cpp's permutation moves whole rows, so the round trip
        # of the unpermuted HF weight is the round trip of the permuted one, unpermuted.
        roundtrip = gguf.quants.dequantize(gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0)
        np.testing.assert_array_equal(ours, roundtrip, err_msg=hf_name)
        step = np.abs(w).max(axis=1, keepdims=True) / 127  # Q8_0's quantization step, at most
        assert (np.abs(ours - w) <= step).all(), hf_name


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1],
                         ids=lambda q: q.name)
def test_quantized_tensor_dequantizes_to_ggufs_round_trip(tmp_path, qtype):
    x = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)  # [rows, cols]
    stored = x.astype(np.float16) if qtype == Q.F16 else gguf.quants.quantize(x, qtype)
    path = _one_tensor_gguf(tmp_path / "t.gguf", stored, qtype)
    got = gguf_reader.dequantize(gguf_reader.open_gguf(path).tensors[0])
    np.testing.assert_array_equal(got, gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype))


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_tensor_dequantizes_like_gguf(tmp_path, qtype):
    # gguf's Python package cannot quantize K-quants; random blocks exercise the same read path.
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(0).integers(0, 256, size=(2, nbytes), dtype=np.uint8)  # 2 rows of 1 block
    path = _one_tensor_gguf(tmp_path / "t.gguf", raw, qtype)
    got = gguf_reader.dequantize(gguf_reader.open_gguf(path).tensors[0])
    assert got.shape == (2, block)
    np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, qtype))


def _one_tensor_gguf(path, data, qtype) -> str:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("t.weight", data, raw_dtype=None if qtype in (Q.F16, Q.F32) else qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return str(path)


def test_llama_metadata_maps_to_model_config(tmp_path):
    model = hc.tiny_hf_model(tie=True)
    path = hc.write_llama_gguf(tmp_path / "m.gguf", model, metadata={
        "llama.attention.sliding_window": (8, V.UINT32),
        "llama.rope.scaling.type": ("linear", V.STRING),
        "llama.rope.scaling.factor": (2.0, V.FLOAT32),
        "tokenizer.ggml.bos_token_id": (1, V.UINT32),
        "tokenizer.ggml.eos_token_id": (2, V.UINT32),
    })
    cfg = gguf_reader.gguf_config(gguf_reader.open_gguf(path))
    assert cfg == ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                              rope_scaling=RopeScaling("linear", 2.0), rms_norm_eps=2.0 ** -16,
                              max_position_embeddings=256, tie_word_embeddings=True, sliding_window=8,
                              bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("key, value, vtype", [
    ("llama.rope.scaling.type", "yarn", V.STRING),
    ("llama.rope.dimension_count", 8, V.UINT32),   # partial rotary: 8 of head_dim 16
], ids=["yarn", "partial_rotary"])
def test_unsupported_metadata_is_named(tmp_path, key, value, vtype):
    model = hc.tiny_hf_model()
    path = hc.write_llama_gguf(tmp_path / "m.gguf", model, metadata={key: (value, vtype)})
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        gguf_reader.gguf_config(gguf_reader.open_gguf(path))


@pytest.mark.parametrize("key, value, vtype", [
    ("llama.attention.head_count", 0, V.UINT32),            # was a ZeroDivisionError traceback
    ("llama.embedding_length", "64", V.STRING),             # was read as 64 by int()
    ("llama.block_count", 2.7, V.FLOAT32),                  # was read as 2 by int()
    ("llama.block_count", True, V.BOOL),                    # was read as 1 layer
    ("llama.feed_forward_length", "abc", V.STRING),         # "invalid literal for int()": no key named
    ("llama.attention.layer_norm_rms_epsilon", "x", V.STRING),
    ("llama.rope.freq_base", [1.0, 2.0], V.ARRAY),
], ids=["zero_heads", "str_width", "float_layers", "bool_layers", "str_ffn", "str_eps", "array_theta"])
def test_metadata_of_the_wrong_type_or_value_is_named(tmp_path, key, value, vtype):
    path = hc.write_llama_gguf(tmp_path / "m.gguf", hc.tiny_hf_model(), metadata={key: (value, vtype)})
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        gguf_reader.gguf_config(gguf_reader.open_gguf(path))


@pytest.mark.parametrize("layers", [3, 10**7, 2**40])
def test_a_block_count_beyond_the_tensors_is_refused_before_anything_is_sized_by_it(tmp_path, capsys, layers):
    """A corrupt llama.block_count (one flipped byte of the header) built name maps and an abstract model
    of that many layers: 10**7 took minutes and gigabytes, 2**40 ran out of memory, instead of an error."""
    path = hc.write_llama_gguf(tmp_path / "m.gguf", hc.tiny_hf_model(),
                               metadata={"llama.block_count": (layers, V.UINT64)})
    assert main(["--gguf", path, str(tmp_path / "out")]) == 2
    assert f"llama.block_count={layers} needs" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_other_architecture_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="general.architecture='qwen2'"):
        gguf_reader.gguf_config(gguf_reader.open_gguf(str(tmp_path / "q.gguf")))


@pytest.mark.parametrize("name, match", [
    ("rope_freqs.weight", "rope_freqs.weight"),      # llama3 RoPE factors as a tensor
    ("blk.0.attn_q.bias", "blk.0.attn_q.bias"),      # attention bias (Qwen2-style)
], ids=["rope_freqs", "bias"])
def test_unexpected_tensor_is_named(tmp_path, name, match):
    model = hc.tiny_hf_model()
    path = hc.write_llama_gguf(tmp_path / "m.gguf", model,
                               extra_tensors=[(name, np.ones(8, np.float32), None)])
    reader = gguf_reader.open_gguf(path)
    with pytest.raises(ValueError, match=match):
        gguf_reader.check_tensors(reader, gguf_reader.gguf_config(reader))
