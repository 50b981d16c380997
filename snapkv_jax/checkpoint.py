"""Converted checkpoints: an orbax checkpoint of the params pytree beside `config.json` and tokenizer files.

Layout of a checkpoint directory:
    config.json    HF-style model config (`ModelConfig.to_hf`) plus `"snapkv_jax": {"dtype": ...}`
    params/        orbax StandardCheckpointer output of the params pytree
    tokenizer*.json, special_tokens_map.json, ...   what `tokenizer.save_pretrained` writes (optional)

`load` restores against the abstract params of the config, so a checkpoint whose tensors do not match
the config (missing, extra, mis-shaped or of another dtype) is refused, never half-loaded.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from snapkv_jax import sharding
from snapkv_jax.config import ModelConfig
from snapkv_jax.models.llama import param_shapes

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def save(out_dir: str, cfg: ModelConfig, params: dict[str, Any], tokenizer=None) -> None:
    """Writes a checkpoint into the (new or empty) directory `out_dir`. Not atomic by itself: the
    converter writes into a temporary directory and renames it once `load` has verified it."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    dtypes = {str(x.dtype) for x in jax.tree_util.tree_leaves(params)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
        raise ValueError(f"params must all be float32 or all bfloat16, got dtypes {sorted(dtypes)}")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out_dir, "params"), params)
        ckptr.wait_until_finished()
    config = cfg.to_hf() | {"snapkv_jax": {"dtype": next(iter(dtypes))}}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def load(checkpoint_dir: str, mesh=None) -> tuple[ModelConfig, dict[str, Any], Any]:
    """Returns `(cfg, params, tokenizer)` of a converted checkpoint (tokenizer None if none was saved).
    With a `mesh` (snapkv_jax.make_mesh) each device reads only its own shard of every param
    (sharding.py's layout); no device ever holds the whole model.

    Raises FileNotFoundError for a missing directory or config and ValueError when the stored params do
    not match the config.
    """
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    config_path = os.path.join(checkpoint_dir, "config.json")
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"no such checkpoint directory: {checkpoint_dir}")
    if not os.path.exists(config_path) or not os.path.isdir(os.path.join(checkpoint_dir, "params")):
        raise FileNotFoundError(f"{checkpoint_dir} is not a snapkv-jax checkpoint (needs config.json and "
                                f"params/; convert with snapkv-convert)")
    with open(config_path) as f:
        config = json.load(f)
    cfg = ModelConfig.from_hf(config)
    dtype_name = config.get("snapkv_jax", {}).get("dtype", "float32")
    if dtype_name not in _DTYPES:
        raise ValueError(f"{config_path}: unsupported params dtype {dtype_name!r}")
    # Restore onto this process's default device, whatever devices the checkpoint was saved from (a
    # checkpoint converted on a GPU, or across several devices, must load on a one-device CPU machine).
    shapes = param_shapes(cfg, _DTYPES[dtype_name])
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        places = jax.tree_util.tree_map(lambda _: device, shapes)
    else:
        sharding.check_mesh(mesh, cfg)
        places = sharding.param_shardings(shapes, mesh)
    abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      shapes, places)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(os.path.join(checkpoint_dir, "params"), abstract)
    except ValueError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise ValueError(f"{checkpoint_dir}: stored params do not match its config.json: {first}") from None
    return cfg, params, _load_tokenizer(checkpoint_dir)


def _load_tokenizer(checkpoint_dir: str):
    if not any(os.path.exists(os.path.join(checkpoint_dir, n))
               for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(checkpoint_dir)

