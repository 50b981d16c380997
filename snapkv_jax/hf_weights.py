"""Hugging Face safetensors -> params pytree, without torch.

The explicit name map (`hf_name_map`) is the one place that ties HF tensor names to our params layout
(see `snapkv_jax.models.llama`). HF stores Linear weights as `[out, in]`; our Dense kernels are `[in, out]`,
so projections are transposed. HF Llama/Mistral q/k weights are already in the split-half RoPE layout we
use (only GGUF files need un-permuting, see `conversion/gguf_reader.py`).

Checkpoints are untrusted input: pickled files (`*.bin`, `*.pt`) are refused, every tensor's name, shape
and count is checked against the config from the safetensors header before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import warnings
from typing import Any

import jax.numpy as jnp
from safetensors import safe_open

from snapkv_jax import sharding
from snapkv_jax.config import ModelConfig
from snapkv_jax.models.llama import param_shapes

ParamPath = tuple[str, ...]
# HF tensors that carry no weights we need (buffers some exporters save).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def hf_name_map(cfg: ModelConfig) -> dict[str, tuple[ParamPath, bool]]:
    """HF tensor name -> (params path, transpose?) for every tensor a checkpoint of `cfg` must hold."""
    names: dict[str, tuple[ParamPath, bool]] = {
        "model.embed_tokens.weight": (("embed", "embedding"), False),
        "model.norm.weight": (("final_norm", "scale"), False),
    }
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), True)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", f"layers_{i}"
        names[f"{hf}.input_layernorm.weight"] = ((ours, "attn_norm", "scale"), False)
        names[f"{hf}.post_attention_layernorm.weight"] = ((ours, "mlp_norm", "scale"), False)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{hf}.self_attn.{proj}.weight"] = ((ours, "attn", proj, "kernel"), True)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{hf}.mlp.{proj}.weight"] = ((ours, "mlp", proj, "kernel"), True)
    return names


def get_path(tree: dict, path: ParamPath):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: ParamPath, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def require_directory(hf_dir: str) -> None:
    """Raises FileNotFoundError unless `hf_dir` is a directory, saying whether the path is missing or is
    something else."""
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir} is not a directory (a Hugging Face model directory is expected)"
                                if os.path.exists(hf_dir) else f"no such directory: {hf_dir}")


def safetensors_files(hf_dir: str) -> list[str]:
    """The safetensors files of a HF dir: the shards its index names, or its `*.safetensors`.

    Raises FileNotFoundError for a missing dir/config/weights and ValueError for pickled weights only.
    """
    require_directory(hf_dir)
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"{hf_dir} has no config.json; is it a Hugging Face model directory?")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON, no or a malformed weight_map
            reason = f"no {e}" if isinstance(e, KeyError) else (str(e).splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{index} is not a safetensors index with a weight_map of tensor -> shard file "
                             f"({reason})") from None
        files = [os.path.join(hf_dir, s) for s in shards]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"shard {missing[0]} named in {index} does not exist")
        return files
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if files:
        return files
    pickled = [p for ext in ("*.bin", "*.pt", "*.pth") for p in glob.glob(os.path.join(hf_dir, ext))]
    if pickled:
        raise ValueError(f"{pickled[0]} is a pickled checkpoint, which snapkv-jax never loads (it can run "
                         f"arbitrary code); convert it to safetensors, e.g. save_pretrained(..., "
                         f"safe_serialization=True)")
    raise FileNotFoundError(f"no *.safetensors weights in {hf_dir}")


def _open(path: str):
    try:
        return safe_open(path, framework="flax")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise ValueError(f"cannot read safetensors file {path}: {e}") from None


def _same_tensor(found: dict, a: str, b: str) -> bool:
    """Whether tensors `a` and `b` of a checkpoint (`found`: name -> (file, shape)) are both there, of one
    shape and equal, compared in blocks of rows."""
    if a not in found or b not in found or found[a][1] != found[b][1]:
        return False
    rows, n = 4096, found[a][1][0]
    with _open(found[a][0]) as fa, _open(found[b][0]) as fb:
        x, y = fa.get_slice(a), fb.get_slice(b)
        return all(bool(jnp.array_equal(x[i:min(i + rows, n)], y[i:min(i + rows, n)])) for i in range(0, n, rows))


def load_hf(hf_dir: str, dtype=jnp.float32, progress: bool = False,
            mesh=None) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads a HF Llama/Mistral dir (`config.json` + single or sharded safetensors) into
    `(ModelConfig, params)` with params in `dtype` (float32 or bfloat16). With a `mesh`, each tensor goes
    to its shards as it is read (sharding.py's layout).

    Raises FileNotFoundError/ValueError for a missing dir, missing config, unsupported architecture,
    pickled weights, truncated files, and missing, extra or mis-shaped tensors. A config that ties the
    embeddings over a checkpoint whose `lm_head.weight` differs from them loads untied (the returned
    config says so), with a warning, as transformers does.
    """
    cfg = ModelConfig.from_hf(hf_dir)
    sharding.check_mesh(mesh, cfg)
    files = safetensors_files(hf_dir)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}                        # name -> (file, shape)
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                if not name.endswith(_IGNORED_SUFFIXES):
                    found[name] = (path, tuple(f.get_slice(name).get_shape()))
    # A tied config over a checkpoint that also holds lm_head.weight: tied when it equals the embedding
    # (some exporters write both), else untied with a warning, as transformers (>= 5) loads it ("both are
    # present in the checkpoints with different values, so we will NOT tie them").
    if cfg.tie_word_embeddings and "lm_head.weight" in found:
        if _same_tensor(found, "lm_head.weight", "model.embed_tokens.weight"):
            del found["lm_head.weight"]
        else:
            warnings.warn(f"{hf_dir}: config.json ties the word embeddings, but lm_head.weight differs from "
                          f"model.embed_tokens.weight; loading them untied, as transformers does (set "
                          f"tie_word_embeddings to false in config.json to silence this)", UserWarning,
                          stacklevel=2)
            cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    expected = hf_name_map(cfg)
    shapes = param_shapes(cfg)
    located: dict[str, str] = {}
    for name, (path, shape) in found.items():
        if name not in expected:
            raise ValueError(f"unexpected tensor {name!r} in {path} for a {cfg.num_layers}-layer "
                             f"Llama/Mistral (an unsupported architecture?)")
        target, transpose = expected[name]
        want = get_path(shapes, target).shape
        want = want[::-1] if transpose else want
        if shape != tuple(want):
            raise ValueError(f"tensor {name!r} in {path} has shape {shape}, config needs {tuple(want)}")
        located[name] = path
    missing = sorted(set(expected) - set(located))
    if missing:
        raise ValueError(f"{len(missing)} tensors missing from {hf_dir}, e.g. {missing[0]!r}")
    params: dict[str, Any] = {}
    items = sorted(located.items(), key=lambda kv: kv[1])
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc="loading safetensors", unit="tensor")
    handles: dict[str, Any] = {}
    try:
        for name, path in items:
            if path not in handles:
                handles[path] = _open(path).__enter__()
            try:
                x = handles[path].get_tensor(name)
            except Exception as e:
                raise ValueError(f"cannot read tensor {name!r} from {path} (truncated file?): {e}") from None
            target, transpose = expected[name]
            x = jnp.asarray(x, dtype)
            set_path(params, target, sharding.place_param(x.T if transpose else x, target, mesh))
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return cfg, params

