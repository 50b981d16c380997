"""The harness every study runs in: settings, the loaded model, resumable cells, progress, results files.

A study cuts its work into `Cell`s (e.g. one method at one budget and one prompt length, all samples).
`Context.run` computes the cells in order under one tqdm bar counted in prompts, and stores each finished
cell as `DIR/cells/<key>.json` tagged with a fingerprint of everything its result depends on (the
study, checkpoint, dtype, seed, the scale's sample counts and study-specific knobs, the cell's key). A
rerun loads a stored cell whose fingerprint matches instead of recomputing it, so a run that was cut off
resumes where it stopped, and adding a method or a budget to a finished run computes only the new cells.
Every file is written to a temporary name and renamed into place (`os.replace`): an interrupted run
never leaves a half-written file that a rerun would trust. Code is not fingerprinted: after changing how
a study builds or scores its prompts, run it into a fresh DIR.

`DIR/results.json` holds the study's results with the command line, device, jax version, date, seed
and settings; plots are PNGs beside it.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from experiments import methods

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Scale:
    """What a study runs at one scale. Studies subclass it to add their own knobs (depths, offsets, ...).
    `methods == ()` means the study compares no methods (`--methods` is then refused).

    `batch` is the row count of every `sk.generate` call: fixed, so that every batch of one prompt
    width and one method shape reuses one compiled program, across cells and across studies run in one
    process (`experiments.run all`). Short batches are filled with copies of a real prompt."""
    methods: tuple[str, ...]
    budgets: tuple[int, ...]      # KV capacities (slots per layer, row and KV head)
    lengths: tuple[int, ...]      # context lengths in tokens: prompt + max_new_tokens fit in each
    samples: int                  # prompts per accuracy cell
    max_new_tokens: int
    batch: int                    # rows per generate call
    dtype: str = "float32"        # params dtype: float32 on the CPU, bfloat16 (tensor cores) on the GPU

    # Fields that only enumerate cells (each cell's key names its own value): left out of fingerprints,
    # so that growing them reuses the cells already computed.
    AXES: ClassVar[tuple[str, ...]] = ("methods", "budgets", "lengths")


@dataclasses.dataclass(frozen=True)
class Settings:
    name: str
    out: str
    scale_name: str
    scale: Scale
    seed: int
    checkpoint: str | None        # None: the default model
    argv: tuple[str, ...]


@dataclasses.dataclass
class Cell:
    """A unit of work: `compute(advance)` returns a JSON-able dict and calls `advance(n)` after each n
    prompts; `size` is its prompt count (for the progress bar); `key` names its file (unique per study)."""
    key: str
    size: int
    compute: Callable[[Callable[[int], None]], dict]


@functools.lru_cache(maxsize=2)
def load_model(checkpoint: str | None = None, dtype: str = "float32"):
    """(cfg, params, tokenizer) of a converted checkpoint, or of the default model (downloaded and
    converted on first use), params cast to `dtype`. Cached: a process running several studies loads once."""
    import snapkv_jax as sk
    if checkpoint is None:
        from snapkv_jax.default_model import default_checkpoint_dir
        checkpoint = default_checkpoint_dir()
    cfg, params, tokenizer = sk.load(checkpoint)
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.dtype(dtype)), params)
    return cfg, params, tokenizer


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Calls `write(tmp_path)` on a temporary file beside `path`, then renames it onto `path`."""
    directory, base = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=os.path.splitext(base)[1])
    os.close(fd)
    try:
        # mkstemp makes the file 0600; results and plots get the mode a plain open() would (from the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
    write_atomic(path, dump)


def write_text(path: str, text: str) -> None:
    def dump(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, dump)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class Context:
    """What a study's `run(ctx)` gets: settings, the model, `run(cells)`, `save_figure`."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.scale = settings.scale
        self.seed = settings.seed
        self.out = settings.out
        shared = {k: v for k, v in dataclasses.asdict(settings.scale).items() if k not in settings.scale.AXES}
        self._base = [settings.name, settings.checkpoint, settings.seed, shared]

    def fingerprint(self, key: str) -> str:
        return hashlib.sha256(json.dumps(self._base + [key], sort_keys=True).encode()).hexdigest()[:16]

    @functools.cached_property
    def model(self):
        return load_model(self.settings.checkpoint, self.scale.dtype)

    @property
    def cfg(self):
        return self.model[0]

    @property
    def params(self):
        return self.model[1]

    @property
    def tokenizer(self):
        return self.model[2]

    def check_lengths(self) -> None:
        """Raises ValueError when a context length passes the model's positions."""
        limit = self.cfg.max_position_embeddings
        for length in self.scale.lengths:
            if length > limit:
                raise ValueError(f"length {length} exceeds the model's {limit} positions")

    def run(self, cells: list[Cell]) -> dict[str, dict]:
        """Results of every cell by key, computing only those without a stored result for these settings."""
        keys = [c.key for c in cells]
        if len(set(keys)) != len(keys):
            raise ValueError(f"cell keys must be unique, got {keys}")
        results = {}
        with tqdm(total=sum(c.size for c in cells), desc=self.settings.name, unit="prompt",
                  file=sys.stderr, dynamic_ncols=True) as bar:
            for c in cells:
                path = os.path.join(self.out, "cells", f"{c.key}.json")
                stored = _read_json(path)
                if stored is not None and stored.get("fingerprint") == self.fingerprint(c.key):
                    results[c.key] = stored["result"]
                    bar.update(c.size)
                    continue
                bar.set_postfix_str(c.key)
                start = time.perf_counter()
                result = c.compute(bar.update)
                result["seconds"] = round(time.perf_counter() - start, 3)
                write_json(path, {"fingerprint": self.fingerprint(c.key), "key": c.key, "result": result})
                results[c.key] = result
        return results

    def save_figure(self, fig, name: str) -> str:
        """Writes `fig` (a matplotlib Figure) as DIR/name.png; returns the path."""
        path = os.path.join(self.out, f"{name}.png")
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
        return path


def metadata(settings: Settings, seconds: float) -> dict:
    """Provenance for results.json: command, device, versions, date, seed, settings."""
    dev = jax.devices()[0]
    return {
        "experiment": settings.name,
        "command": shlex.join(["python", "-m", "experiments.run", *settings.argv]),
        "device": f"{dev.platform}: {dev.device_kind} x{jax.device_count()}",
        "jax": jax.__version__,
        "snapkv_jax": _package_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": settings.seed,
        "scale": settings.scale_name,
        "settings": dataclasses.asdict(settings.scale),
        "checkpoint": settings.checkpoint or "default (SmolLM2-135M-Instruct)",
        "commit": _git_commit(),
        "seconds": round(seconds, 1),
    }


def _git_commit() -> str | None:
    """HEAD of the repository this code runs from, "+dirty" when it has uncommitted changes; None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("snapkv-jax")
    except PackageNotFoundError:
        return None


def execute(study, ctx: Context) -> dict:
    """Runs `study` (a module of experiments.studies) in `ctx`; writes and returns results.json's content."""
    start = time.perf_counter()
    results = study.run(ctx)
    doc = metadata(ctx.settings, time.perf_counter() - start) | {"results": results}
    write_json(os.path.join(ctx.out, "results.json"), doc)
    return doc


def validate(study, scale: Scale) -> None:
    """Raises ValueError for settings no run could use: unknown methods or dtype, budgets <= the methods'
    window (in studies that compare methods; the others check their own windows), samples, lengths,
    batch or max_new_tokens < 1, and whatever the study's own `validate(scale)` refuses."""
    # A study without methods (observation, pooling) checks its budgets against its own windows.
    methods.check(scale.methods, scale.budgets if scale.methods else ())
    for name in ("samples", "max_new_tokens", "batch"):
        if getattr(scale, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(scale, name)}")
    if any(n < 1 for n in scale.lengths):
        raise ValueError(f"context lengths must be >= 1, got {scale.lengths}")
    if scale.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {scale.dtype!r}; use one of {', '.join(DTYPES)}")
    if hasattr(study, "validate"):
        study.validate(scale)
