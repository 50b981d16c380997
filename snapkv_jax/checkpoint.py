"""Converted checkpoints: an orbax checkpoint of the params pytree beside `config.json` and tokenizer files.

Layout of a checkpoint directory:
    config.json    HF-style model config (`ModelConfig.to_hf`) plus `"snapkv_jax": {"dtype": ...}`
    params/        orbax StandardCheckpointer output of the params pytree
    tokenizer*.json, special_tokens_map.json, ...   what `tokenizer.save_pretrained` writes (optional)

`load` restores against the abstract params of the config, so a checkpoint whose tensors do not match
the config (missing, extra, mis-shaped or of another dtype) is refused, never half-loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import types
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from snapkv_jax import sharding
from snapkv_jax.config import ModelConfig
from snapkv_jax.models.llama import is_fused, param_shapes

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def save(out_dir: str, cfg: ModelConfig, params: dict[str, Any], tokenizer=None) -> None:
    """Writes a checkpoint into the (new or empty) directory `out_dir`. Not atomic by itself: the
    converter writes into a temporary directory and renames it once `load` has verified it."""
    if is_fused(params):
        raise ValueError("fused params (sk.fuse_projections) are not written as a checkpoint, which holds the "
                         "separate layout: save those, and fuse after load")
    out_dir = os.path.abspath(out_dir)
    dtypes = {str(x.dtype) for x in jax.tree_util.tree_leaves(params)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
        raise ValueError(f"params must all be float32 or all bfloat16, got dtypes {sorted(dtypes)}")
    # Checked before anything is written: params of another config made a checkpoint that `load` refuses.
    # (One dtype throughout, the config's shapes made in it: the signatures differ only by shape.)
    got, want = _signature(params), _signature(param_shapes(cfg, _DTYPES[next(iter(dtypes))]))
    if got != want:
        name = (sorted(got.keys() ^ want.keys()) or sorted(n for n in want if got[n] != want[n]))[0]
        raise ValueError(f"params do not match the config: {name} is "
                         f"{list(got[name][0]) if name in got else 'missing'}, the config needs "
                         f"{list(want[name][0]) if name in want else 'none'}")
    os.makedirs(out_dir, exist_ok=True)
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

    Raises FileNotFoundError for a missing directory or config, and ValueError for a config.json that is
    not JSON, stored params that do not match the config (from orbax's metadata, before any tensor is
    read) and tensor data that cannot be read (truncated or overwritten files).
    """
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    config = _read_config(checkpoint_dir)
    cfg = ModelConfig.from_hf(config)
    dtype_name = _stored_dtype(config, checkpoint_dir)
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
    params_dir = os.path.join(checkpoint_dir, "params")
    damage = None
    with ocp.StandardCheckpointer() as ckptr:
        with _abandoned_reads_quieted() as quiet:  # an unreadable manifest leaves abandoned reads too
            try:
                stored = _stored_signature(ckptr, params_dir)
            except Exception as e:  # orbax/tensorstore errors of a damaged or foreign params/ directory
                quiet()
                raise ValueError(f"{params_dir} cannot be read as an orbax checkpoint: {_first_line(e)}") from None
            if not stored:  # orbax logged the failed read and returned no metadata
                quiet()
        _check_signature(stored, shapes, checkpoint_dir)
        with _abandoned_reads_quieted() as quiet:
            try:
                params = ckptr.restore(params_dir, abstract)
            except Exception as e:
                if not _is_read_error(e):  # out of memory, a bad mesh, a bug: not the file's fault
                    raise
                damage = _first_line(e)  # the metadata matched, the tensor data did not (truncated, ...)
                quiet()
    if damage is not None:
        raise ValueError(f"{params_dir} is damaged: {damage}")
    return cfg, params, _load_tokenizer(checkpoint_dir)


class _AbandonedReads(logging.Filter):
    """After a failed restore orbax's other reads of the damaged files still run, unawaited, on its
    event loop; each prints a traceback ("unhandled exception during asyncio.run() shutdown", "Task
    exception was never retrieved", "Exception ignored in <coroutine ...>", "Event loop is closed",
    "coroutine ... was never awaited"),
    during the restore, right after it or at interpreter exit. As a filter of the asyncio logger during a
    restore, and for the rest of the process once one has failed (`keep`), it drops those reports, and
    only those: the ValueError already says the checkpoint is damaged. One instance per process."""

    kept = False

    @staticmethod
    def abandoned(text: str) -> bool:
        return any(word in text for word in ("orbax", "TensorStore", "OCDBT"))

    def filter(self, record) -> bool:
        return not (record.exc_info and self.abandoned(str(record.exc_info[1]) + record.getMessage()))

    def keep(self) -> None:
        """Keeps the filter and drops the unraisable reports and never-awaited warnings of orbax's
        abandoned coroutines from now on (installed once per process)."""
        if not self.kept:
            self.kept = True
            previous = sys.unraisablehook

            def hook(unraisable):
                coroutine = unraisable.object
                if not (isinstance(coroutine, types.CoroutineType) and self.abandoned(
                        coroutine.__qualname__ + str(unraisable.exc_value) + coroutine.cr_code.co_filename)):
                    previous(unraisable)

            sys.unraisablehook = hook
            warnings.filterwarnings("ignore", r"coroutine '_read_array_index_and_device_put' was never awaited",
                                    RuntimeWarning)


_ABANDONED = _AbandonedReads()


@contextlib.contextmanager
def _abandoned_reads_quieted():
    """For one orbax read of a possibly damaged checkpoint: yields `quiet`, to call when the read failed,
    which drops the tracebacks of orbax's abandoned reads (`_AbandonedReads`): those printed on fd 2 from
    C++ during the block, and those of the asyncio logger and unraisable hook for the rest of the process."""
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addFilter(_ABANDONED)  # orbax may log them while the read fails (Python 3.12)
    with _fd2_captured() as captured:  # tensorstore prints them from C++, past every Python hook

        def quiet():
            _ABANDONED.keep()
            time.sleep(0.5)  # the abandoned reads end meanwhile; what they print is dropped
            captured.truncate(0)

        try:
            yield quiet
        finally:
            if not _ABANDONED.kept:
                asyncio_log.removeFilter(_ABANDONED)


def _is_read_error(error: BaseException) -> bool:
    """Whether a failed restore is tensorstore failing to read the stored bytes (it raises ValueError
    with a status such as OUT_OF_RANGE or DATA_LOSS, which orbax wraps)."""
    return isinstance(_root_cause(error), ValueError)


@contextlib.contextmanager
def _fd2_captured():
    """Points file descriptor 2 at a temporary file for the block and yields the file; afterwards what
    it holds goes to the real stderr (nothing, if the block truncated it)."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        try:
            os.dup2(captured.fileno(), 2)
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            os.write(2, captured.read())


def _root_cause(error: BaseException) -> BaseException:
    """The innermost `__cause__`: orbax wraps tensorstore's error in its own."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _first_line(error: BaseException) -> str:
    """The first line of the innermost cause's message."""
    root = _root_cause(error)
    lines = str(root).strip().splitlines()
    return (lines[0] if lines else type(root).__name__)[:300]


def _stored_signature(ckptr, params_dir: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{param path: (shape, dtype name)}` of the stored params, read from orbax's metadata alone."""
    meta = ckptr.metadata(params_dir)
    meta = getattr(meta, "item_metadata", meta)  # newer orbax wraps the tree in a StepMetadata
    tree = getattr(meta, "tree", meta)
    return _signature(tree)


def _signature(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{param path: (shape, dtype name)}` of a tree of arrays, shape structs or orbax metadata."""
    return {jax.tree_util.keystr(path): (tuple(m.shape), str(m.dtype))
            for path, m in jax.tree_util.tree_leaves_with_path(tree)}


def _check_signature(stored, shapes, checkpoint_dir: str) -> None:
    """Raises ValueError naming the first param that is missing, extra, or of another shape or dtype
    than the config prescribes: checked before any tensor is read, so a mismatch never starts a restore."""
    want = _signature(shapes)
    if not stored:
        raise ValueError(f"{checkpoint_dir}/params holds no readable tensor metadata (damaged or incomplete "
                         f"checkpoint; convert it again)")
    where = f"{checkpoint_dir}: stored params do not match its config.json:"
    if missing := sorted(want.keys() - stored.keys()):
        raise ValueError(f"{where} {len(missing)} missing, e.g. {missing[0]}")
    if extra := sorted(stored.keys() - want.keys()):
        raise ValueError(f"{where} {len(extra)} not in the model, e.g. {extra[0]}")
    for name, (shape, dtype) in sorted(want.items()):
        if stored[name] != (shape, dtype):
            raise ValueError(f"{where} {name} is {stored[name][1]}{list(stored[name][0])}, the config "
                             f"needs {dtype}{list(shape)}")


def params_dtype(checkpoint_dir: str) -> str:
    """The dtype name ("float32" or "bfloat16") of a checkpoint's params, from its config.json alone (no
    tensor read). Raises as `load` does for a missing or unreadable config."""
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    return _stored_dtype(_read_config(checkpoint_dir), checkpoint_dir)


def _read_config(checkpoint_dir: str) -> dict[str, Any]:
    config_path = os.path.join(checkpoint_dir, "config.json")
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"no such checkpoint directory: {checkpoint_dir}")
    if not os.path.exists(config_path) or not os.path.isdir(os.path.join(checkpoint_dir, "params")):
        raise FileNotFoundError(f"{checkpoint_dir} is not a snapkv-jax checkpoint (needs config.json and "
                                f"params/; convert with snapkv-convert)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object (the model's config), "
                         f"got a {type(config).__name__}")
    return config


def _stored_dtype(config: dict[str, Any], checkpoint_dir: str) -> str:
    ours = config.get("snapkv_jax", {})
    dtype_name = ours.get("dtype", "float32") if isinstance(ours, dict) else ours
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:  # a list is not even hashable
        raise ValueError(f"{os.path.join(checkpoint_dir, 'config.json')}: unsupported params dtype {dtype_name!r}")
    return dtype_name


def _load_tokenizer(checkpoint_dir: str):
    if not any(os.path.exists(os.path.join(checkpoint_dir, n))
               for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(checkpoint_dir)

