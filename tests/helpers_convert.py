"""Converter test helpers: tiny random HF Llama models and their GGUF twins in llama.cpp's layout.

Everything is built locally (no downloads). The GGUF writer here is the test's own oracle of llama.cpp's
layout, written independently of `conversion/`: its q/k permutation is an explicit index map, and its
tensor names come from a table of HF name patterns.
"""

from __future__ import annotations

import re

import gguf
import numpy as np
import transformers
from gguf import GGMLQuantizationType as Q

from tests import hf_models

# Tiny but quantizable: every row of a GGUF matrix (ne0 = the HF `in` dim: 64 or 128) is a whole
# number of 32-element Q8_0 blocks. rms_norm_eps is a power of two so that GGUF's float32 copy is exact.
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            rms_norm_eps=2.0 ** -16, rope_theta=10000.0, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)

# HF tensor name pattern -> GGUF name template (llama.cpp's convert_hf_to_gguf names).
HF_TO_GGUF = {
    r"model\.embed_tokens\.weight": "token_embd.weight",
    r"model\.norm\.weight": "output_norm.weight",
    r"lm_head\.weight": "output.weight",
    r"model\.layers\.(\d+)\.input_layernorm\.weight": "blk.{}.attn_norm.weight",
    r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight": "blk.{}.attn_q.weight",
    r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight": "blk.{}.attn_k.weight",
    r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight": "blk.{}.attn_v.weight",
    r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight": "blk.{}.attn_output.weight",
    r"model\.layers\.(\d+)\.post_attention_layernorm\.weight": "blk.{}.ffn_norm.weight",
    r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight": "blk.{}.ffn_gate.weight",
    r"model\.layers\.(\d+)\.mlp\.up_proj\.weight": "blk.{}.ffn_up.weight",
    r"model\.layers\.(\d+)\.mlp\.down_proj\.weight": "blk.{}.ffn_down.weight",
}


# HF tensor name pattern -> our params path (layout of snapkv_jax/models/llama.py); projections are
# stored transposed ([in, out]); the embedding and norm scales as they are.
HF_TO_PARAMS = {
    r"model\.embed_tokens\.weight": ("embed/embedding", False),
    r"model\.norm\.weight": ("final_norm/scale", False),
    r"lm_head\.weight": ("lm_head/kernel", True),
    r"model\.layers\.(\d+)\.input_layernorm\.weight": ("layers_{}/attn_norm/scale", False),
    r"model\.layers\.(\d+)\.post_attention_layernorm\.weight": ("layers_{}/mlp_norm/scale", False),
    r"model\.layers\.(\d+)\.self_attn\.(\w_proj)\.weight": ("layers_{}/attn/{}/kernel", True),
    r"model\.layers\.(\d+)\.mlp\.(\w+_proj)\.weight": ("layers_{}/mlp/{}/kernel", True),
}


def params_leaf(params, hf_name: str) -> np.ndarray:
    """The leaf of `params` that holds HF tensor `hf_name`, in HF's layout (un-transposed), float32."""
    for pattern, (template, transposed) in HF_TO_PARAMS.items():
        m = re.fullmatch(pattern, hf_name)
        if m:
            x = params
            for key in template.format(*m.groups()).split("/"):
                x = x[key]
            x = np.asarray(x, np.float32)
            return x.T if transposed else x
    raise KeyError(hf_name)


def gguf_name(hf_name: str) -> str:
    for pattern, template in HF_TO_GGUF.items():
        m = re.fullmatch(pattern, hf_name)
        if m:
            return template.format(*m.groups())
    raise KeyError(hf_name)


def tiny_hf_model(seed: int = 0, tie: bool = False, **overrides) -> transformers.LlamaForCausalLM:
    """A float32 random tiny Llama with perturbed norm weights."""
    config = transformers.LlamaConfig(**(TINY | {"tie_word_embeddings": tie} | overrides))
    return hf_models.instantiate(transformers.LlamaForCausalLM, config, seed)


def hf_tensors(model) -> dict[str, np.ndarray]:
    """The model's state dict as float32 NumPy, without the tied `lm_head.weight` alias."""
    tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation, HF split-half rows -> interleaved rows, as an explicit index map:
    in each head of D rows, GGUF row 2*i + s holds HF row s*D/2 + i (i < D/2, s in {0, 1})."""
    d = w.shape[0] // n_heads
    source = np.empty(w.shape[0], np.int64)
    for h in range(n_heads):
        for i in range(d // 2):
            for s in range(2):
                source[h * d + 2 * i + s] = h * d + s * (d // 2) + i
    return w[source]


def write_llama_gguf(path, model, qtype=lambda name: Q.F32, extra_tensors=(), metadata=None) -> str:
    """Writes `model` as a llama.cpp-layout GGUF at `path`: llama.* metadata, q/k rows permuted, each
    tensor stored as `qtype(gguf_name)` (F32 or a type `gguf.quants.quantize` supports; 1-D tensors
    always F32, as llama.cpp does). `extra_tensors` are (name, array, raw_dtype) triples added as they
    are; `metadata` maps extra keys to (value, GGUFValueType). No tokenizer metadata is written."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    V = gguf.GGUFValueType
    keys = {"llama.block_count": (c.num_hidden_layers, V.UINT32),
            "llama.context_length": (c.max_position_embeddings, V.UINT32),
            "llama.embedding_length": (c.hidden_size, V.UINT32),
            "llama.feed_forward_length": (c.intermediate_size, V.UINT32),
            "llama.attention.head_count": (c.num_attention_heads, V.UINT32),
            "llama.attention.head_count_kv": (c.num_key_value_heads, V.UINT32),
            "llama.rope.freq_base": (c.rope_parameters["rope_theta"], V.FLOAT32),
            "llama.attention.layer_norm_rms_epsilon": (c.rms_norm_eps, V.FLOAT32),
            "llama.rope.dimension_count": (c.head_dim, V.UINT32),
            "llama.vocab_size": (c.vocab_size, V.UINT32)}
    for key, (value, vtype) in (keys | (metadata or {})).items():  # `metadata` may replace a standard key
        w.add_key_value(key, value, vtype)
    for hf_name, x in hf_tensors(model).items():
        name = gguf_name(hf_name)
        if name.endswith("attn_q.weight"):
            x = permute_rope_rows(x, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            x = permute_rope_rows(x, c.num_key_value_heads)
        t = qtype(name) if x.ndim == 2 else Q.F32
        if t == Q.F32:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, t), raw_dtype=t)
    for name, x, raw_dtype in extra_tensors:
        w.add_tensor(name, x, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over TINY's vocabulary, built locally."""
    import tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, TINY["vocab_size"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def truncate(path, keep: float = 0.5) -> None:
    """Cuts the file at `path` to the first `keep` fraction of its bytes."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])
