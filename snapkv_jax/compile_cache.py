"""JAX's persistent compilation cache for snapkv-jax: compiled programs are written to disk, so a second
process (a restarted notebook kernel, the next CLI call) loads them instead of compiling again.

`snapkv-generate` and `make demo` turn it on. In a notebook, call `sk.enable_compilation_cache()` once
before the first `generate`. The directory is `$SNAPKV_JAX_COMPILATION_CACHE`, else
`~/.cache/snapkv_jax/xla` (beside the default model); `SNAPKV_JAX_COMPILATION_CACHE=off` disables it.
"""

from __future__ import annotations

import os

import jax

ENV = "SNAPKV_JAX_COMPILATION_CACHE"


def cache_path() -> str | None:
    """The cache directory, or None when `$SNAPKV_JAX_COMPILATION_CACHE` is "off"."""
    from snapkv_jax.default_model import cache_dir
    value = os.environ.get(ENV, "")
    if value.lower() in ("off", "0", "false", "no"):
        return None
    return value or os.path.join(cache_dir(), "xla")


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache in `path` (default: `cache_path()`); caches every
    program, however fast it compiled. Returns the directory, or None when disabled by the variable.
    Raises ValueError when `path` cannot be a directory (a file, or under one)."""
    path = path or cache_path()
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"the compilation cache directory {path} cannot be created: {e.strerror}") from None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
