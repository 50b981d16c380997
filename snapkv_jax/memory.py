"""Device-memory arithmetic for layer-major prefill: the peak it needs, the memory there is, the chunk
size `chunk="auto"` picks, and the clear error before a prompt that cannot fit.

What is alive at the peak of a layer's prefill program (generate.py), in bytes:
  * the params, and the compressed caches of the layers already done (and of this layer, being built);
  * the hidden states `[B, T, Dm]` (donated in and out of each layer) and this layer's full-length K/V
    buffers `[B, K, T, D]` x 2: the only full-prompt arrays;
  * one chunk's activations: q, attention output and the merge's float32 partials, the MLP's gate, up
    and product `[B, c, F]`, norms and residuals;
  * on the `jnp` attention path, the chunk's float32 logits and probabilities `[B, H, c, T]`;
  * the method's scores: SnapKV-style `[B, H, T]` float32 a few times over (window scores, pooled,
    reduced, top-k), H2O's accumulator plus one query block's `[B, H, q, T]` logits;
  * a reconstructing method's (KVzip's) own arrays, by its `reconstruction_bytes`: the reconstruction's
    hidden states, one reconstruction chunk's activations and its scores' probabilities.
The estimate is deliberately simple and errs high; experiments/bench_long_context.py prints it beside
the measured peak.
"""

from __future__ import annotations

import os
import re

import jax

from snapkv_jax.config import ModelConfig

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
BUDGET_ENV = "SNAPKV_JAX_MEMORY_BUDGET"
# Leave this share of the free memory to XLA's own workspace and fragmentation.
_HEADROOM = 0.9
# H2O scores one query block at a time; its float32 logits stay under this many bytes.
H2O_BLOCK_BYTES = 1 << 28


def parse_bytes(text: str) -> int:
    """'12GiB', '512 MiB', '1e9' -> bytes. Raises ValueError for anything else."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{BUDGET_ENV}={text!r} is not a size like '12GiB' or '2000000000'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: int) -> str:
    """1536 -> '1.50 KiB'; the largest binary unit that keeps the figure >= 1."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def free_bytes() -> int | None:
    """Device memory this process may still allocate: `$SNAPKV_JAX_MEMORY_BUDGET` when set, else the
    GPU's limit minus what is in use, else (CPU) the host's available memory; None if unknown."""
    if os.environ.get(BUDGET_ENV):
        return parse_bytes(os.environ[BUDGET_ENV])
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def prefill_peak_bytes(cfg: ModelConfig, *, batch: int, width: int, chunk: int | None, cache_slots: int,
                       itemsize: int, compress=None, flash: bool = True) -> int:
    """Estimated peak bytes of a prefill of `batch` rows padded to `width` tokens, besides the params.

    `cache_slots`: slots of the finished cache summed over layers; `flash`: attention by cuDNN (no
    `[H, c, T]` logits) rather than the `jnp` path.
    """
    b, t, c = batch, width, chunk or width
    dm, f, h, k, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    hidden = b * t * dm * itemsize
    full_kv = 2 * b * k * t * d * itemsize
    cache = b * k * cache_slots * (2 * d * itemsize + 4)
    chunk_acts = b * c * (4 * h * d + 3 * f + 4 * dm) * itemsize + 2 * b * c * h * d * 4
    attention = 0 if flash else 3 * b * h * c * t * 4
    scores = 0
    if compress is not None:
        scores = 4 * b * h * t * 4
        if compress.needs_query_scores:
            scores += min(H2O_BLOCK_BYTES, b * h * c * t * 4) * 3
        if getattr(compress, "reconstructs", False):
            scores += compress.reconstruction_bytes(cfg, b, t, itemsize, flash)
    logits = b * cfg.vocab_size * 4
    return hidden + full_kv + cache + chunk_acts + attention + scores + logits


def params_bytes(params) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(params))


def largest_fitting_width(fits, width: int) -> int:
    """The largest w <= width with fits(w) (0 if none), by bisection over a monotone predicate."""
    lo, hi = 0, width
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
