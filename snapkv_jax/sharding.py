"""Several devices: a `jax.sharding.Mesh` with axes `data`, `seq` and `model`, and where every array of
the model lives on it. XLA's partitioner and collectives do the work (GSPMD under `jit`, `shard_map` where
a step must stay on the shard that holds its data); nothing here moves bytes by hand.

- `model`: tensor parallelism, Megatron-style (Shoeybi et al., arXiv 1909.08053): q/k/v/gate/up kernels
  split by output columns (attention heads, MLP columns), o/down kernels by input rows, so each layer
  needs one all-reduce after attention and one after the MLP. The LM head is split by vocabulary. The KV
  cache is split by KV head, and each compression method scores and selects a KV head's positions on the
  shard that holds it.
- `data`: data parallelism: rows of the batch (tokens, lengths, cache) split over it; params replicated.
- `seq`: sequence parallelism for prefill (ring_prefill.py): the prompt split over it.

A mesh may name any subset of the three axes; an absent axis has size 1. `model` must divide the KV
heads (so query heads and MLP columns too, for the shapes we take), `data` the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from snapkv_jax.config import ModelConfig

AXES = ("data", "seq", "model")


def make_mesh(data: int = 1, seq: int = 1, model: int = 1, devices=None) -> Mesh:
    """A mesh of `data x seq x model` devices (the first that many of `devices`, default all of
    `jax.devices()`). Raises ValueError when there are too few devices or a size is not positive."""
    sizes = {"data": data, "seq": seq, "model": model}
    for name, n in sizes.items():
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"mesh axis {name} must be a positive integer, got {n!r}")
    devices = list(jax.devices() if devices is None else devices)
    need = data * seq * model
    if need > len(devices):
        raise ValueError(f"a mesh of data={data} x seq={seq} x model={model} needs {need} devices; "
                         f"{len(devices)} are available")
    return Mesh(np.asarray(devices[:need]).reshape(data, seq, model), AXES)


def parse_mesh(text: str) -> Mesh:
    """`"data=2,model=2"` (any of data/seq/model, each at most once) -> `make_mesh(...)`. Raises
    ValueError naming the bad part."""
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name not in AXES or name in sizes or not value.strip().isdigit():
            raise ValueError(f"bad mesh {text!r}: expected comma-separated AXIS=N with AXIS one of {AXES} "
                             f"(each once), e.g. 'data=2,model=2'")
        sizes[name] = int(value)
    return make_mesh(**sizes)


def axis_size(mesh: Mesh | None, name: str) -> int:
    """Devices along axis `name` (1 when there is no mesh or the mesh has no such axis)."""
    if mesh is None or name not in mesh.axis_names:
        return 1
    return mesh.shape[name]


def spec(mesh: Mesh, *names) -> P:
    """A PartitionSpec over `names` (axis names or None per dimension), with axes the mesh lacks (or of
    size 1) replaced by None."""
    return P(*(n if n is not None and axis_size(mesh, n) > 1 else None for n in names))


def named(mesh: Mesh, *names) -> NamedSharding:
    return NamedSharding(mesh, spec(mesh, *names))


def constrain(x, mesh: Mesh | None, *names):
    """`x` constrained to `spec(mesh, *names)` inside a jitted function (unchanged without a mesh)."""
    return x if mesh is None else jax.lax.with_sharding_constraint(x, named(mesh, *names))


def check_mesh(mesh: Mesh | None, cfg: ModelConfig, batch: int | None = None) -> None:
    """Raises ValueError when `mesh` cannot hold this model (or this batch): unknown axis names, a
    `model` axis that does not divide the KV heads, query heads and MLP width, a `data` axis that does
    not divide the batch."""
    if mesh is None:
        return
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh (see snapkv_jax.make_mesh), got {type(mesh).__name__}")
    unknown = [n for n in mesh.axis_names if n not in AXES]
    if unknown:
        raise ValueError(f"mesh axes {unknown} are not among {AXES}")
    m = axis_size(mesh, "model")
    for what, n in (("num_kv_heads", cfg.num_kv_heads), ("num_heads", cfg.num_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % m:
            raise ValueError(f"mesh axis model={m} must divide the model's {what}={n}")
    d = axis_size(mesh, "data")
    if batch is not None and batch % d:
        raise ValueError(f"mesh axis data={d} must divide the batch of {batch} rows")


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of one param, from its path in the pytree (models/llama.py's layout). The LM
    head is split by vocabulary when `model` divides it, else replicated."""
    name = "/".join(path)
    if "qkv_proj/kernel" in name or "gate_up_proj/kernel" in name:  # fuse_projections' layout
        if axis_size(mesh, "model") > 1:  # a column split would cut across the q|k|v and gate|up blocks
            raise ValueError(f"fused projections (sk.fuse_projections) cannot be split over the mesh's model "
                             f"axis (model={axis_size(mesh, 'model')}) yet: use the separate params there")
        return P()                                        # replicated: there is no model axis to split over
    if any(f"{p}/kernel" in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) or (
            "lm_head/kernel" in name and shape[1] % axis_size(mesh, "model") == 0):
        return spec(mesh, None, "model")                  # [Dm, out]: column-parallel
    if any(f"{p}/kernel" in name for p in ("o_proj", "down_proj")):
        return spec(mesh, "model", None)                  # [in, Dm]: row-parallel
    return P()                                            # embedding, norm scales: replicated


def param_shardings(params_or_shapes, mesh: Mesh):
    """A pytree of NamedShardings matching `params_or_shapes` (arrays or ShapeDtypeStructs)."""
    def one(path, x):
        return NamedSharding(mesh, param_spec(tuple(k.key for k in path), x.shape, mesh))
    return jax.tree_util.tree_map_with_path(one, params_or_shapes)


def place_param(x: jax.Array, path: tuple[str, ...], mesh: Mesh | None) -> jax.Array:
    """One param `x` (at `path` in the pytree) moved onto its shards of `mesh` (unchanged without a
    mesh): loaders place each tensor as they read it, so no device ever holds the whole model."""
    return x if mesh is None else jax.device_put(x, NamedSharding(mesh, param_spec(path, x.shape, mesh)))


def shard_params(params, cfg: ModelConfig, mesh: Mesh):
    """`params` placed on `mesh` (a no-op for arrays already placed so). Raises ValueError when the
    mesh cannot hold the model."""
    check_mesh(mesh, cfg)
    return jax.device_put(params, param_shardings(params, mesh))


def layer_index(layer: int) -> jax.Array:
    """`layer` as an int32 scalar on the default device (uncommitted, so a program on a mesh takes it
    too), made once per process and default device: a Python or NumPy scalar argument costs every call of
    a compiled program a host-to-device transfer (a jitted call took 0.11-0.27 ms of host time with a NumPy
    scalar, 0.04-0.08 ms with a device one, H200 hosts, 2026-12-04), and prefill and extend pass one per
    layer program."""
    return _device_int(layer, jax.config.jax_default_device)


@functools.lru_cache(maxsize=None)
def _device_int(value: int, default_device) -> jax.Array:
    return jax.device_put(np.int32(value))


def lead_param(params) -> jax.Array:
    """The embedding table, whose dtype and placement are every param's; read without flattening the
    params (a flatten of a 7B model's ~290 arrays costs ~0.2 ms of host time per call on an H200 host)."""
    return params["embed"]["embedding"]


def mesh_of(params) -> Mesh | None:
    """The mesh `params` live on, if they were placed with NamedShardings over more than one device."""
    return array_mesh(lead_param(params))


def array_mesh(x) -> Mesh | None:
    """The mesh array `x` lives on, if it was placed with a NamedSharding over more than one device."""
    s = getattr(x, "sharding", None)
    return several_devices(s.mesh) if isinstance(s, NamedSharding) else None


def several_devices(mesh: Mesh | None) -> Mesh | None:
    """`mesh` if it spans more than one device, else None: a mesh of one device places arrays as one
    device does."""
    return mesh if mesh is not None and math.prod(mesh.shape.values()) > 1 else None


def resolve_mesh(mesh: Mesh | None, params) -> Mesh | None:
    """The mesh a call runs on: the one passed, else the one the params live on, else None."""
    return mesh if mesh is not None else mesh_of(params)


def place_rows(mesh: Mesh, *arrays) -> tuple[Any, ...]:
    """Host arrays whose first axis is the batch, split over `data` (replicated over the other axes)."""
    return tuple(jax.device_put(a, named(mesh, "data", *([None] * (np.ndim(a) - 1)))) for a in arrays)


def cache_shardings(cache, mesh: Mesh):
    """NamedShardings for a KVCache: K/V `[B, K, S, D]` and pos `[B, K, S]` split by row over `data` and
    by KV head over `model`; the per-row vectors (and the per-layer rows `offsets [L, B]`) by row."""
    kv4, kv3, row = named(mesh, "data", "model", None, None), named(mesh, "data", "model", None), named(mesh, "data")
    return cache.replace(k=tuple(kv4 for _ in cache.k), v=tuple(kv4 for _ in cache.v),
                         pos=tuple(kv3 for _ in cache.pos), end=row, next_pos=row, lengths=row,
                         offsets=None if cache.offsets is None else named(mesh, None, "data"),
                         context_mark=None if cache.context_mark is None else row)


def place_cache(cache, mesh: Mesh | None):
    """`cache` on `mesh`, split by row and KV head (`cache_shardings`; a no-op when it is there already).
    Without a mesh (params on one device), raises ValueError for a cache that lives on one: its arrays
    and the params would meet in one program on different devices."""
    if mesh is not None:
        return jax.device_put(cache, cache_shardings(cache, mesh))
    if (where := array_mesh(cache.k[0])) is not None:
        raise ValueError(f"the cache lives on a mesh (axes {dict(where.shape)}) but the params on one device: "
                         f"pass mesh= (or params placed by snapkv_jax.shard_params) to run on that mesh")
    return cache


def per_device(cfg: ModelConfig, batch: int, mesh: Mesh | None) -> tuple[ModelConfig, int]:
    """(the shapes, the rows) one device holds of a call of `batch` rows on `mesh`: heads and MLP width
    divided by `model` (`per_device_config`), rows by `data` (for memory estimates and chunk budgets)."""
    return per_device_config(cfg, mesh), batch // axis_size(mesh, "data")


def per_device_config(cfg: ModelConfig, mesh: Mesh | None) -> ModelConfig:
    """The shapes one device of the `model` axis holds: heads and MLP width divided by its size (for
    memory estimates)."""
    m = axis_size(mesh, "model")
    if m == 1:
        return cfg
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // m, num_kv_heads=cfg.num_kv_heads // m,
                               intermediate_size=cfg.intermediate_size // m)
