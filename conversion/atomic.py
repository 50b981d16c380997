"""Atomic checkpoint output: a checkpoint directory appears complete and verified, or not at all.

`write_checkpoint` writes into a temporary sibling `.<name>.tmp-XXXXXXXX` of the output (same parent, so
the final `os.rename` stays on one filesystem and is atomic), reloads it with `snapkv_jax.checkpoint.load`,
checks config, shapes and dtypes, and only then renames it into place. Any exception (including
KeyboardInterrupt; a signal that arrives while orbax writes takes effect when the write ends) removes the
temporary directory and the parent directories it created. With `overwrite`, the old checkpoint is moved aside
only after verification succeeded and is deleted only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import sys
import threading
import uuid
from typing import Any

import jax

from snapkv_jax import checkpoint
from snapkv_jax.config import ModelConfig
from snapkv_jax.models.llama import param_shapes


def looks_like_checkpoint(path: str) -> bool:
    """Whether `path` is a directory holding a converted checkpoint (config.json and params/)."""
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "params"))


class OutputExistsError(FileExistsError, ValueError):
    """The output directory exists and may not be replaced: a FileExistsError, and a ValueError as every
    bad argument of the API is (DESIGN section 6)."""


def creation_blocker(path: str) -> OSError | None:
    """Why the directory `path` (absent) could not be created, judged on its nearest existing ancestor:
    a NotADirectoryError or PermissionError whose message names that ancestor; None if it could."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return NotADirectoryError(f"{parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        return PermissionError(f"{parent} is not writable")
    return None


def check_output(out_dir: str, overwrite: bool) -> None:
    """Raises OutputExistsError if `out_dir` exists and may not be replaced: always without `overwrite`;
    with it, unless it is a checkpoint or an empty directory (so a typo never deletes a home directory).
    Raises NotADirectoryError / PermissionError when `out_dir` could not be created at all (a parent is
    a file, or the nearest existing parent is not writable): before any model is read."""
    if not os.path.lexists(out_dir):
        if blocker := creation_blocker(out_dir):
            raise type(blocker)(f"cannot create output {out_dir}: {blocker}")
        return
    if not overwrite:
        raise OutputExistsError(f"output {out_dir} already exists; pass --overwrite to replace it")
    if os.path.islink(out_dir):
        raise OutputExistsError(f"output {out_dir} is a symbolic link; refusing to replace it (name its target)")
    if not os.path.isdir(out_dir):
        raise OutputExistsError(f"output {out_dir} exists and is not a directory; refusing to replace it")
    if os.listdir(out_dir) and not looks_like_checkpoint(out_dir):
        raise OutputExistsError(f"output {out_dir} is a non-empty directory that is not a snapkv-jax "
                              f"checkpoint; refusing to replace it")


def verify(checkpoint_dir: str, cfg: ModelConfig, params: dict[str, Any], tokenizer, mesh=None) -> None:
    """Reloads `checkpoint_dir` and raises ValueError unless its config equals `cfg`, the written and the
    reloaded params both have exactly the structure, shapes and dtype that `param_shapes(cfg)` prescribes
    (in the dtype of `params`), and a tokenizer is present exactly when one was saved."""
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    got_cfg, got, got_tok = checkpoint.load(checkpoint_dir, mesh)  # onto the mesh, if converting onto one
    if got_cfg != cfg:
        raise ValueError(f"verification of {checkpoint_dir} failed: its config {got_cfg} != {cfg}")
    want = _signature(param_shapes(cfg, dtype))
    for name, tree in (("written", params), ("reloaded", got)):
        if _signature(tree) != want:
            raise ValueError(f"verification of {checkpoint_dir} failed: {name} params do not match the "
                             f"shapes/dtypes that the config needs")
    if (got_tok is None) != (tokenizer is None):
        raise ValueError(f"verification of {checkpoint_dir} failed: tokenizer saved={tokenizer is not None}, "
                         f"reloaded={got_tok is not None}")


def _signature(params):
    """The params pytree with each leaf replaced by its (shape, dtype name)."""
    return jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), params)


def write_checkpoint(out_dir: str, cfg: ModelConfig, params: dict[str, Any], tokenizer=None, *,
                     overwrite: bool = False, mesh=None) -> str:
    """Writes, verifies and atomically publishes a checkpoint at `out_dir`; returns its absolute path.

    Raises OutputExistsError (see `check_output`, also if `out_dir` appears while writing) and ValueError
    when verification fails; in every failure case nothing is left at `out_dir` or beside it except
    what was there before.
    """
    out_dir = os.path.abspath(out_dir)
    check_output(out_dir, overwrite)
    created, tmp = [], None
    try:
        _raise_held_interrupt()
        _make_parents(os.path.dirname(out_dir), created)
        tmp = _new_sibling(out_dir, "tmp")
        # orbax's commit threads must not outlive the removal below
        with _interrupts_deferred("removing the partial checkpoint once its write ends"):
            checkpoint.save(tmp, cfg, params, tokenizer)
        verify(tmp, cfg, params, tokenizer, mesh)
        _raise_held_interrupt()
        # Renames only, and the old checkpoint's removal: a signal now waits for them and is then
        # ignored (the new checkpoint is in place; stopping midway would leave the old one half-deleted).
        with _interrupts_deferred("finishing the checkpoint's publication", reraise=False):
            _publish(tmp, out_dir, overwrite)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):  # innermost first; only if still empty
            with contextlib.suppress(OSError):
                os.rmdir(parent)
        raise
    return out_dir


def _make_parents(directory: str, created: list[str]) -> None:
    """Creates `directory` and its missing ancestors, appending each one it created to `created`
    (outermost first, as it goes, so a failure midway still lists them)."""
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:  # made meanwhile by another process: not ours to remove
            continue
        created.append(path)


# Signals whose KeyboardInterrupt `raise_interrupt` held back inside a gc callback, for `_raise_held_interrupt`.
_HELD: list[int] = []


def raise_interrupt(signum, frame) -> None:
    """The CLI's SIGINT/SIGTERM handler: raises KeyboardInterrupt, except inside a gc callback, where
    Python would drop it (printing "Exception ignored in"; jax's `_xla_gc_callback` runs at every
    collection, so often while tensors are read). There it holds the signal back, and `write_checkpoint`
    raises it before it writes or publishes anything."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None and frame.f_code not in callbacks:
        frame = frame.f_back
    if frame is None:
        raise KeyboardInterrupt
    if not _HELD:
        print("interrupted: stopping before the checkpoint is published", file=sys.stderr, flush=True)
    _HELD.append(signum)


@contextlib.contextmanager
def interrupts_raised():
    """Inside the block SIGINT and SIGTERM raise KeyboardInterrupt (`raise_interrupt`); a signal still
    held back when the block ends is forgotten."""
    try:
        with signal_handlers(raise_interrupt):
            yield
    finally:
        _HELD.clear()


def _raise_held_interrupt() -> None:
    """Raises KeyboardInterrupt (once) if `raise_interrupt` held a signal back."""
    if _HELD:
        _HELD.clear()
        raise KeyboardInterrupt


_RESTORE_DEFAULT = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


@contextlib.contextmanager
def signal_handlers(handler, signals=(signal.SIGINT, signal.SIGTERM)):
    """Installs `handler` for `signals` inside the block and restores the previous ones after (one
    installed outside Python, which cannot be reinstalled, becomes the default). A no-op outside the
    main thread, where Python neither delivers signals nor lets handlers be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, _RESTORE_DEFAULT[s] if old is None else old)


@contextlib.contextmanager
def _interrupts_deferred(doing: str, reraise: bool = True):
    """Holds SIGINT and SIGTERM until the block ends, saying on stderr that it is `doing`, then raises
    KeyboardInterrupt (or, without `reraise`, lets the process go on). For an orbax save: interrupted
    midway it keeps writing from its background threads, so its directory could not be removed. A
    second signal interrupts at once, leaving what the block had written."""
    received = []

    def defer(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        print(f"interrupted: {doing} (interrupt again to stop at once, leaving what is written)",
              file=sys.stderr, flush=True)

    with signal_handlers(defer):
        yield
    if received and reraise:
        raise KeyboardInterrupt


def _new_sibling(out_dir: str, tag: str) -> str:
    """Creates and returns the empty directory `.<name>.<tag>-XXXXXXXX` beside `out_dir` (mode from the
    umask, like the `mkdir` of a plain output directory; `tempfile.mkdtemp` would make it 0700)."""
    parent, name = os.path.split(out_dir)
    path = os.path.join(parent, f".{name}.{tag}-{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    return path


def _publish(tmp: str, out_dir: str, overwrite: bool) -> None:
    """Renames the verified `tmp` to `out_dir`, replacing an old checkpoint there only with `overwrite`."""
    check_output(out_dir, overwrite)  # again: another process may have written it meanwhile
    if not os.path.lexists(out_dir):
        try:
            os.rename(tmp, out_dir)
        except OSError as e:  # appeared between the check and the rename
            raise OutputExistsError(f"output {out_dir} appeared while converting: {e}") from None
        return
    old = _new_sibling(out_dir, "old")
    os.rename(out_dir, old)  # onto the empty directory `old`: atomic on POSIX
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old)
