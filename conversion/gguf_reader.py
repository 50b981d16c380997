"""GGUF (llama.cpp) file -> `(ModelConfig, params)`, plus the tokenizer its metadata describes.

Only the `llama` architecture is read (llama.cpp also stores Mistral as `llama`, with an optional
`llama.attention.sliding_window`). Layout facts this module depends on:

- GGUF lists a tensor's dims in ggml's `ne` order, fastest-varying first: a HF Linear weight `[out, in]`
  is stored with ne `[in, out]`, and `GGUFReader` hands back its data (or quantized bytes) as the NumPy
  array `[out, in]`. So after dequantizing, a projection is in HF's layout and is transposed into our
  `[in, out]` kernel; the embedding `[V, Dm]` and the norm vectors are used as they are.
- llama.cpp's converter permutes the rows of q/k weights so that its interleaved RoPE (rotating pairs
  (2i, 2i+1)) computes what HF's split-half RoPE computes (pairs (i, i + D/2)). We use the split-half
  layout, so `unpermute_rope_rows` undoes that permutation.

Checkpoints are untrusted input: every tensor's name, type and shape is checked against the config built
from the metadata before any tensor data is read, and a bad file raises `ValueError` naming the tensor.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import gguf
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as VT

from snapkv_jax import sharding
from snapkv_jax.config import ModelConfig, RopeScaling
from snapkv_jax.hf_weights import ParamPath, get_path, set_path
from snapkv_jax.models.llama import param_shapes

# Tensor types we dequantize, all through `gguf.quants.dequantize`. Others (IQ*, TQ*, MXFP4, integer
# and float64 tensors) are refused: no llama.cpp export of a Llama/Mistral model we target uses them.
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

# How a GGUF tensor becomes a params leaf (the dequantized array is HF's layout, see the module doc):
#   "as_is"  embedding [V, Dm] and norm scales [Dm]
#   "linear" [out, in] -> transposed to the kernel [in, out]
#   "rope_q" / "rope_k"  q / k projection: rows un-permuted per query / KV head, then transposed
Layout = Literal["as_is", "linear", "rope_q", "rope_k"]


def gguf_name_map(cfg: ModelConfig) -> dict[str, tuple[ParamPath, Layout]]:
    """GGUF tensor name -> (params path, layout) for every tensor a llama GGUF of `cfg` must hold."""
    names: dict[str, tuple[ParamPath, Layout]] = {
        "token_embd.weight": (("embed", "embedding"), "as_is"),
        "output_norm.weight": (("final_norm", "scale"), "as_is"),
    }
    if not cfg.tie_word_embeddings:
        names["output.weight"] = (("lm_head", "kernel"), "linear")
    for i in range(cfg.num_layers):
        blk, ours = f"blk.{i}", f"layers_{i}"
        names[f"{blk}.attn_norm.weight"] = ((ours, "attn_norm", "scale"), "as_is")
        names[f"{blk}.attn_q.weight"] = ((ours, "attn", "q_proj", "kernel"), "rope_q")
        names[f"{blk}.attn_k.weight"] = ((ours, "attn", "k_proj", "kernel"), "rope_k")
        names[f"{blk}.attn_v.weight"] = ((ours, "attn", "v_proj", "kernel"), "linear")
        names[f"{blk}.attn_output.weight"] = ((ours, "attn", "o_proj", "kernel"), "linear")
        names[f"{blk}.ffn_norm.weight"] = ((ours, "mlp_norm", "scale"), "as_is")
        names[f"{blk}.ffn_gate.weight"] = ((ours, "mlp", "gate_proj", "kernel"), "linear")
        names[f"{blk}.ffn_up.weight"] = ((ours, "mlp", "up_proj", "kernel"), "linear")
        names[f"{blk}.ffn_down.weight"] = ((ours, "mlp", "down_proj", "kernel"), "linear")
    return names


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation: `w [n_heads * D, in]` (GGUF order) -> HF's order.

    Within one head of D rows, HF's split-half layout holds the first halves of the rotation pairs in
    rows 0..D/2-1 and the second halves in rows D/2..D-1: HF row `s * D/2 + i` (s in {0, 1}, i < D/2).
    llama.cpp interleaves them so pair i sits in rows 2i, 2i+1: GGUF row `2i + s` = HF row `s * D/2 + i`.
    Reading the GGUF rows as [head, i, s] and swapping to [head, s, i] gives HF's order back.
    """
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def open_gguf(path: str) -> gguf.GGUFReader:
    """A reader over the GGUF file at `path` (memory-mapped; nothing is dequantized yet).

    Raises FileNotFoundError for a missing file, ValueError for a truncated or corrupt one.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is a directory, not a GGUF file" if os.path.isdir(path)
                                else f"no such GGUF file: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises bare ValueErrors/IndexErrors deep inside NumPy for short files
        raise ValueError(f"cannot read GGUF file {path} (truncated or not a GGUF file?): {e}") from None


def _field(reader: gguf.GGUFReader, key: str, default: Any = None, required: bool = False) -> Any:
    field = reader.get_field(key)
    if field is None:
        if required:
            raise ValueError(f"GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _scalar(reader: gguf.GGUFReader, key: str, default: Any = None, required: bool = False) -> Any:
    value = _field(reader, key, default, required)
    if isinstance(value, list):  # e.g. per-layer head counts (OpenELM), which a Llama does not have
        raise ValueError(f"GGUF metadata {key}={value!r}: per-layer values are not supported")
    return value


_INT_TYPES = frozenset({VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64})
_REAL_TYPES = _INT_TYPES | {VT.FLOAT32, VT.FLOAT64}


def _typed(reader: gguf.GGUFReader, key: str, types: frozenset, what: str, default: Any = None,
           required: bool = False) -> Any:
    """The scalar at `key` if its GGUF value type is one of `types`; ValueError naming the key otherwise
    (a string, float or bool where a count belongs would be converted by int() or float() silently or
    raise a message that does not say which key is wrong)."""
    value = _scalar(reader, key, default, required)
    field = reader.get_field(key)
    if field is not None and (not field.types or field.types[0] not in types):
        kind = field.types[0].name if field.types else "no type"
        raise ValueError(f"GGUF metadata {key}={value!r} is of type {kind}; {what} is expected")
    return value


def _int(reader: gguf.GGUFReader, key: str, default: Any = None, required: bool = False) -> Any:
    return _typed(reader, key, _INT_TYPES, "an integer", default, required)


def _real(reader: gguf.GGUFReader, key: str, default: Any = None, required: bool = False) -> Any:
    return _typed(reader, key, _REAL_TYPES, "a number", default, required)


def gguf_config(reader: gguf.GGUFReader) -> ModelConfig:
    """The ModelConfig that the `llama.*` metadata (and the presence of `output.weight`) describe.

    Raises ValueError naming the key for another architecture, missing required metadata, partial
    rotary embeddings, and RoPE scaling other than linear.
    """
    arch = _field(reader, "general.architecture", required=True)
    if arch != "llama":
        raise ValueError(f"unsupported GGUF general.architecture={arch!r}; snapkv-convert reads 'llama'")
    num_heads = int(_int(reader, "llama.attention.head_count", required=True))
    hidden = int(_int(reader, "llama.embedding_length", required=True))
    if num_heads < 1 or hidden < 1:
        raise ValueError(f"GGUF llama.attention.head_count={num_heads} and llama.embedding_length={hidden} "
                         f"must both be positive")
    head_dim = int(_int(reader, "llama.attention.key_length", hidden // num_heads))
    value_dim = int(_int(reader, "llama.attention.value_length", head_dim))
    rope_dim = int(_int(reader, "llama.rope.dimension_count", head_dim))
    if value_dim != head_dim:
        raise ValueError(f"GGUF llama.attention.value_length={value_dim} differs from key_length={head_dim}")
    if rope_dim != head_dim:
        raise ValueError(f"GGUF llama.rope.dimension_count={rope_dim} != head_dim={head_dim}: partial "
                         f"rotary embeddings are not supported")
    tensor_names = {t.name for t in reader.tensors}
    vocab = _int(reader, "llama.vocab_size")
    if vocab is None and reader.get_field("tokenizer.ggml.tokens") is not None:
        vocab = len(reader.get_field("tokenizer.ggml.tokens").data)
    if vocab is None and "token_embd.weight" in tensor_names:
        vocab = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1])
    if vocab is None:
        raise ValueError("GGUF file has neither llama.vocab_size, a token list nor token_embd.weight")
    sliding = _int(reader, "llama.attention.sliding_window")
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_int(reader, "llama.feed_forward_length", required=True)),
        num_layers=int(_int(reader, "llama.block_count", required=True)),
        num_heads=num_heads,
        num_kv_heads=int(_int(reader, "llama.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rope_theta=float(_real(reader, "llama.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader),
        rms_norm_eps=float(_real(reader, "llama.attention.layer_norm_rms_epsilon", required=True)),
        max_position_embeddings=int(_int(reader, "llama.context_length", required=True)),
        tie_word_embeddings="output.weight" not in tensor_names,
        sliding_window=None if not sliding else int(sliding),
        bos_token_id=_optional_int(_int(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=_optional_int(_int(reader, "tokenizer.ggml.eos_token_id")),
    )


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def _rope_scaling(reader: gguf.GGUFReader) -> RopeScaling | None:
    kind = _scalar(reader, "llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(_real(reader, "llama.rope.scaling.factor", required=True)))
    raise ValueError(f"unsupported GGUF llama.rope.scaling.type={kind!r}; supported: 'none', 'linear'")


def check_tensors(reader: gguf.GGUFReader, cfg: ModelConfig) -> None:
    """Checks names, counts, types and shapes of all tensors against `cfg`, reading no tensor data.

    Raises ValueError naming the first unexpected, missing, unsupported or mis-shaped tensor.
    """
    # Before anything is sized by llama.block_count: a corrupt count (2**40) would otherwise build
    # name maps and an abstract model of that many layers, exhausting memory instead of raising.
    want = 2 + (not cfg.tie_word_embeddings) + 9 * cfg.num_layers
    if len(reader.tensors) < want:
        raise ValueError(f"GGUF llama.block_count={cfg.num_layers} needs {want} tensors, but the file holds "
                         f"only {len(reader.tensors)}: tensors are missing or the block count is wrong")
    expected = gguf_name_map(cfg)
    shapes = param_shapes(cfg)
    seen = set()
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise ValueError("GGUF tensor 'rope_freqs.weight' (llama3-style RoPE frequency factors) is not "
                             "supported; convert the Hugging Face checkpoint with --hf instead")
        if t.name not in expected:
            raise ValueError(f"unexpected GGUF tensor {t.name!r} for a {cfg.num_layers}-layer llama "
                             f"(an unsupported architecture or attention bias?)")
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(f"GGUF tensor {t.name!r} has type {t.tensor_type.name}, which snapkv-convert "
                             f"cannot dequantize (supported: {', '.join(q.name for q in SUPPORTED_TYPES)})")
        path, layout = expected[t.name]
        want = tuple(get_path(shapes, path).shape)           # our leaf
        want = want if layout == "as_is" else want[::-1]     # the dequantized (HF-layout) array
        got = tuple(int(n) for n in reversed(t.shape))       # ne order reversed = NumPy order
        if got != want:
            raise ValueError(f"GGUF tensor {t.name!r} has shape {got} (NumPy order), config needs {want}")
        seen.add(t.name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{len(missing)} tensors missing from the GGUF file, e.g. {missing[0]!r}")


def dequantize(tensor) -> np.ndarray:
    """A `gguf.ReaderTensor` as float32 in NumPy order (its ne dims reversed). Raises ValueError for a
    type outside SUPPORTED_TYPES. (`GGUFReader` already refused files whose data does not fill a tensor.)"""
    if tensor.tensor_type not in SUPPORTED_TYPES:
        raise ValueError(f"GGUF tensor {tensor.name!r} has unsupported type {tensor.tensor_type.name}")
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)


def _to_leaf(x: np.ndarray, layout: Layout, cfg: ModelConfig) -> np.ndarray:
    """A dequantized (HF-layout) array -> our params leaf, as `layout` says (see `Layout`)."""
    if layout == "rope_q":
        x = unpermute_rope_rows(x, cfg.num_heads)                                # [H*D, Dm]
    elif layout == "rope_k":
        x = unpermute_rope_rows(x, cfg.num_kv_heads)                             # [K*D, Dm]
    return x if layout == "as_is" else x.T


def read_gguf(reader: gguf.GGUFReader, dtype=jnp.float32, progress: bool = False,
              mesh=None) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads a llama GGUF file (opened with `open_gguf`) into `(ModelConfig, params)` in `dtype`; with a
    `mesh`, each tensor goes to its shards as it is dequantized.

    Raises ValueError for another architecture, unsupported metadata, and unexpected, missing,
    mis-shaped or unsupported-type tensors, all before any tensor is dequantized.
    """
    cfg = gguf_config(reader)
    check_tensors(reader, cfg)
    sharding.check_mesh(mesh, cfg)
    expected = gguf_name_map(cfg)
    tensors = reader.tensors
    if progress:
        from tqdm import tqdm
        tensors = tqdm(tensors, desc="dequantizing GGUF", unit="tensor")
    params: dict[str, Any] = {}
    for t in tensors:
        target, layout = expected[t.name]
        leaf = jnp.asarray(_to_leaf(dequantize(t), layout, cfg), dtype)
        set_path(params, target, sharding.place_param(leaf, target, mesh))
    return cfg, params


def gguf_tokenizer(path: str, reader: gguf.GGUFReader):
    """The HF tokenizer built from the `tokenizer.ggml.*` metadata of the file at `path` (open as
    `reader`), or None if it has none. Raises ValueError when transformers cannot build it."""
    if reader.get_field("tokenizer.ggml.model") is None:
        return None
    from transformers import AutoTokenizer
    directory, name = os.path.split(os.path.abspath(path))
    try:
        return AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except Exception as e:  # transformers raises assorted types for tokenizer models it cannot convert
        raise ValueError(f"cannot build a tokenizer from the metadata of {path}: {e}") from None
