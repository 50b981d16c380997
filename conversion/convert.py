"""The two conversions: a HF safetensors directory or a llama GGUF file -> a verified orbax checkpoint.

Both check the output path first (so a refused `OUT` costs no reading), read every tensor with a tqdm
bar on stderr, and publish through `conversion.atomic.write_checkpoint` (temporary sibling, reload,
verify, rename).
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from conversion import atomic
from snapkv_jax.config import ModelConfig
from snapkv_jax.hf_weights import load_hf, require_directory

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Files whose presence means a HF directory ships a tokenizer worth copying.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def convert_hf(hf_dir: str, out_dir: str, dtype: str = "float32", overwrite: bool = False, mesh=None) -> str:
    """Converts a HF Llama/Mistral directory (config.json + safetensors, optional tokenizer files) into
    a checkpoint at `out_dir`; returns its absolute path. With a `mesh` (snapkv_jax.make_mesh) every
    tensor goes straight to its shards, and each device writes and re-reads only its own.

    Raises FileNotFoundError / ValueError (see `snapkv_jax.hf_weights.load_hf`) for bad input and
    OutputExistsError (a FileExistsError and a ValueError) for an existing `out_dir` without `overwrite`.
    """
    params_dtype, out_dir = _dtype(dtype), os.path.abspath(out_dir)
    atomic.check_output(out_dir, overwrite)
    require_directory(hf_dir)
    ModelConfig.from_hf(hf_dir)  # before the tokenizer, whose loading reads config.json and hides its faults
    tokenizer = _hf_tokenizer(hf_dir)  # before the weights: a broken tokenizer costs no reading
    cfg, params = load_hf(hf_dir, params_dtype, progress=True, mesh=mesh)
    return atomic.write_checkpoint(out_dir, cfg, params, tokenizer, overwrite=overwrite, mesh=mesh)


def _hf_tokenizer(hf_dir: str):
    """The directory's tokenizer, or None if it ships none; ValueError naming the files if they do not load."""
    present = [n for n in _TOKENIZER_FILES if os.path.exists(os.path.join(hf_dir, n))]
    if not present:
        return None
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    except Exception as e:  # transformers raises ValueError, OSError, JSONDecodeError, ... for bad files
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise ValueError(f"cannot load the tokenizer of {hf_dir} ({', '.join(present)}): {reason}") from None
    # A tokenizer_config.json without its vocabulary (tokenizer.json, tokenizer.model) loads, in
    # transformers 5, as a tokenizer of the special tokens alone that encodes every text to no ids.
    if not tokenizer.encode("hello world", add_special_tokens=False):
        raise ValueError(f"the tokenizer of {hf_dir} ({', '.join(present)}) has no vocabulary: it encodes "
                         f"text to no tokens (is tokenizer.json or tokenizer.model missing?)")
    return tokenizer


def convert_gguf(gguf_file: str, out_dir: str, dtype: str = "float32", overwrite: bool = False,
                 mesh=None) -> str:
    """Converts a llama GGUF file (dequantizing, un-permuting q/k, tokenizer from its metadata) into a
    checkpoint at `out_dir`; returns its absolute path. `mesh`: as in `convert_hf`.

    Raises FileNotFoundError / ValueError (see `conversion.gguf_reader.read_gguf`) for bad input,
    OutputExistsError (a FileExistsError and a ValueError) for an existing `out_dir` without `overwrite`,
    and ModuleNotFoundError without the gguf package.
    """
    try:  # here, not at the top: importing snapkv_jax or this CLI needs no gguf, only this conversion
        from conversion import gguf_reader
    except ImportError as e:
        raise ModuleNotFoundError(f"converting a GGUF file needs the gguf package, a dependency of snapkv-jax "
                                  f"(pip install gguf): {e}") from None
    params_dtype, out_dir = _dtype(dtype), os.path.abspath(out_dir)
    atomic.check_output(out_dir, overwrite)
    reader = gguf_reader.open_gguf(gguf_file)
    cfg, params = gguf_reader.read_gguf(reader, params_dtype, progress=True, mesh=mesh)
    tokenizer = gguf_reader.gguf_tokenizer(gguf_file, reader)
    return atomic.write_checkpoint(out_dir, cfg, params, tokenizer, overwrite=overwrite, mesh=mesh)
