"""Which back-end computes each scoring kernel: decided here and nowhere else.

Back-ends, best first: "mosaic" (Pallas Mosaic GPU, for compute capability >= 9.0, Hopper and later:
`*_mosaic.py`), "triton" (Pallas Triton, Ampere and later: `*_triton.py`; jax 0.11 deprecates it, a later
jax removes it), "xla" (the `jnp` reference, any device). Kernels: "window_scores" (SnapKV's observation
window, window_scores*.py) and "h2o_scores" (H2O's key scores of a prompt chunk, h2o_scores*.py). A shape
class a Mosaic kernel does not take (e.g. more than 256 window rows per KV group) fails its probe, so
"auto" and "pallas" go on to Triton there. Which back-ends "auto" tries on Hopper, per kernel:
`HOPPER_BACKENDS`.

What `impl` (`prefill(snap_impl=)`, `snapkv.select(impl=)`, `compression.select(impl=)`) asks for:
  * "auto": the best kernel back-end of this GPU that lowers on the running jax, else the reference; off
    GPU the reference. A back-end that fails is skipped with one `RuntimeWarning` per back-end and
    process, naming it, the kernel and the reason (a second kernel falling back from it does not warn).
  * "pallas": the best kernel back-end that lowers, never the reference (RuntimeError when none does).
    Off GPU: the Triton kernel in interpret mode, as the CPU tests run it (the Mosaic kernels have their
    own interpreter on jax >= 0.11, which their tests call directly).
  * "mosaic", "triton": that back-end only; RuntimeError when it cannot run here. "xla": the reference.

Why a probe: the kernels run inside large jitted programs (a prefill layer), where a lowering failure
surfaces only when the whole program compiles, too late to take another back-end. So when a kernel is
traced for a shape class (dtype, head_dim, GQA group, window) a back-end has not met, `choose` lowers and
compiles a small standalone call of that class first and keeps the verdict: the outer program then traces
only a back-end that compiled. The verdicts and the warnings given are the package's one piece of
process state: what the running jax and device can lower does not change within a process. Off GPU
nothing is probed (interpret mode needs no kernel compiler); a back-end whose module does not import
(a jax without Pallas Triton) is out everywhere.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from snapkv_jax.pallas.common import supported_head_dim
from snapkv_jax.pallas.h2o_scores import chunk_scores_reference
from snapkv_jax.pallas.window_scores import window_scores_reference

try:
    from snapkv_jax.pallas import h2o_scores_triton, window_scores_triton
    _TRITON_MISSING = None
except ImportError as e:  # a jax without the Pallas Triton back-end
    h2o_scores_triton = window_scores_triton = None
    _TRITON_MISSING = f"jax.experimental.pallas.triton does not import on jax {jax.__version__}: {e}"

try:
    from snapkv_jax.pallas import h2o_scores_mosaic, window_scores_mosaic
    _MOSAIC_MISSING = None
except ImportError as e:  # a jax without the Pallas Mosaic GPU back-end
    h2o_scores_mosaic = window_scores_mosaic = None
    _MOSAIC_MISSING = f"jax.experimental.pallas.mosaic_gpu does not import on jax {jax.__version__}: {e}"

IMPLS = ("auto", "pallas", "mosaic", "triton", "xla")
MOSAIC_CAPABILITY = (9, 0)
# What "auto" and "pallas" try on compute capability >= 9.0, per kernel, best first. Compiled on an H200
# (jax 0.11.2, 2026-12-03; experiments/results/gpu_kernel_tests.log) both Mosaic kernels pass their tests,
# and each is faster than its Triton twin where benchmarked: window scores at every size of
# snapkv_kernel_bench.md, H2O scores 3.20 vs 3.52 ms per Llama-2-7B layer at 16K (h2o_kernel_bench_*.md).
HOPPER_BACKENDS = {"window_scores": ("mosaic", "triton"), "h2o_scores": ("mosaic", "triton")}


class ShapeClass(NamedTuple):
    """What a kernel's lowering depends on besides the back-end (sequence lengths and batch do not)."""

    dtype: str
    head_dim: int
    group: int       # query heads per KV head
    window: int = 0  # observation-window queries (window_scores only)


_VERDICTS: dict[tuple[str, str, ShapeClass], str | None] = {}  # None: lowers and compiles
_WARNED: set[str] = set()  # back-ends whose fallback was warned about


def _module(kernel: str, backend: str):
    """The module holding `kernel` for `backend`, or None (no such kernel, or it does not import)."""
    return {("window_scores", "triton"): window_scores_triton,
            ("h2o_scores", "triton"): h2o_scores_triton,
            ("window_scores", "mosaic"): window_scores_mosaic,
            ("h2o_scores", "mosaic"): h2o_scores_mosaic}.get((kernel, backend))


def _missing(kernel: str, backend: str) -> str:
    if backend == "triton" and _TRITON_MISSING:
        return _TRITON_MISSING
    if backend == "mosaic" and _MOSAIC_MISSING:
        return _MOSAIC_MISSING
    return f"there is no {backend} kernel for {kernel}"


def gpu_capability() -> tuple[int, int] | None:
    """(major, minor) compute capability of the default device when it is a GPU, else None; (0, 0) for
    a GPU that does not report one (Triton kernels only)."""
    if jax.default_backend() != "gpu":
        return None
    cc = getattr(jax.devices()[0], "compute_capability", None)
    if not cc:
        return (0, 0)
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def kernel_order(kernel: str, capability: tuple[int, int] | None) -> tuple[str, ...]:
    """The kernel back-ends "pallas" and "auto" try, best first, on a device of `capability`."""
    if capability is not None and capability >= MOSAIC_CAPABILITY:
        return tuple(b for b in HOPPER_BACKENDS[kernel] if b != "mosaic" or _module(kernel, b) is not None)
    return ("triton",)


def resolve_impl(impl: str, head_dim: int) -> str:
    """`impl` checked before jit: "auto" becomes "xla" where no kernel can run (off GPU, or a head_dim
    the kernels do not take), anything else stays itself (each kernel picks its back-end when traced,
    `choose`). Raises ValueError for an unknown impl, a kernel impl at an unsupported head_dim, or
    "mosaic" on a device below compute capability 9.0."""
    if impl not in IMPLS:
        raise ValueError(f"unknown SnapKV impl {impl!r}; use one of {IMPLS}")
    kernel = impl not in ("auto", "xla")
    if kernel and not supported_head_dim(head_dim):
        raise ValueError(f"impl={impl!r} needs head_dim a power of two >= 16, got head_dim={head_dim}")
    capability = gpu_capability()
    if impl == "mosaic" and (capability is None or capability < MOSAIC_CAPABILITY):
        where = "a CPU" if capability is None else f"a GPU of compute capability {capability[0]}.{capability[1]}"
        raise ValueError(f"impl='mosaic' needs a GPU of compute capability >= 9.0 (Hopper or later); this is {where}")
    if impl == "auto" and (capability is None or not supported_head_dim(head_dim)):
        return "xla"
    return impl


def choose(kernel: str, impl: str, shape: ShapeClass) -> str:
    """The back-end ("mosaic", "triton" or "xla") that runs `kernel` for `impl` at this shape class;
    probes (lowers and compiles a small call of) each candidate once per process. Raises RuntimeError
    (one line) when an explicit kernel impl cannot run here, ValueError for an unknown impl."""
    if impl not in IMPLS:
        raise ValueError(f"unknown SnapKV impl {impl!r}; use one of {IMPLS}")
    capability = gpu_capability()
    if impl == "xla" or (impl == "auto" and (capability is None or not supported_head_dim(shape.head_dim))):
        return "xla"
    if impl in ("mosaic", "triton"):
        candidates = (impl,)
    else:
        candidates = kernel_order(kernel, capability) + (("xla",) if impl == "auto" else ())
    probe = capability is not None
    for backend, fallback in zip(candidates[:-1], candidates[1:]):
        reason = _verdict(kernel, backend, shape, probe)
        if reason is None:
            return backend
        if backend not in _WARNED:
            _WARNED.add(backend)
            warnings.warn(f"snapkv_jax: the {backend} back-end of {kernel} fails on jax {jax.__version__} "
                          f"({reason}); using {fallback} instead (said once per back-end)", RuntimeWarning,
                          stacklevel=3)
    last = candidates[-1]
    reason = None if last == "xla" else _verdict(kernel, last, shape, probe)
    if reason is not None:
        raise RuntimeError(f"impl={impl!r}: the {last} kernel for {kernel} cannot run here: {reason}")
    return last


def _verdict(kernel: str, backend: str, shape: ShapeClass, probe: bool) -> str | None:
    """None when `kernel` runs on `backend` at `shape`, else the reason in one line."""
    if _module(kernel, backend) is None:
        return _missing(kernel, backend)
    if not probe:
        return None
    key = (kernel, backend, shape)
    if key not in _VERDICTS:
        fn, args = _probe_call(kernel, backend, shape)
        try:
            jax.jit(fn).lower(*args).compile()
            _VERDICTS[key] = None
        # Lowering and compiling fail in many types (NotImplementedError, ValueError, LoweringException,
        # XlaRuntimeError, the Triton or Mosaic compilers' own): any of them means "not here".
        except Exception as e:
            _VERDICTS[key] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    return _VERDICTS[key]


def _probe_call(kernel: str, backend: str, shape: ShapeClass):
    """A small standalone call of `kernel` on `backend` at `shape`: (function, ShapeDtypeStruct args)."""
    dtype, d, g = jnp.dtype(shape.dtype), shape.head_dim, shape.group
    spec = jax.ShapeDtypeStruct
    if kernel == "window_scores":
        args = (spec((1, g, shape.window, d), dtype), spec((1, 1, 256, d), dtype), spec((1,), jnp.int32))
        return lambda q, k, lengths: _call_window_scores(backend, q, k, lengths), args
    args = (spec((1, g, 64, d), dtype), spec((1, 1, 128, d), dtype), spec((1, g, 64), jnp.float32),
            spec((1,), jnp.int32), spec((), jnp.int32))
    return lambda q, k, lse, lengths, start: _call_h2o_scores(backend, q, k, lse, lengths, start), args


def _call_window_scores(backend, q_window, keys, lengths):
    return _module("window_scores", backend).window_scores(q_window, keys, lengths, interpret=_interpret())


def _call_h2o_scores(backend, q_chunk, keys, lse, lengths, start):
    return _module("h2o_scores", backend).h2o_chunk_scores(q_chunk, keys, lse, lengths, start,
                                                           interpret=_interpret())


def window_scores(q_window: jax.Array, keys: jax.Array, lengths: jax.Array, impl: str) -> jax.Array:
    """SnapKV's observation-window scores `[B, H, T]` float32 (window_scores.py's contract) by the
    back-end `choose` picks for `impl`. q_window `[B, H, w, D]`, keys `[B, K, T, D]`, lengths `[B]`."""
    shape = ShapeClass(jnp.dtype(keys.dtype).name, keys.shape[3], q_window.shape[1] // keys.shape[1],
                       q_window.shape[2])
    backend = choose("window_scores", impl, shape)
    if backend == "xla":
        return window_scores_reference(q_window, keys, lengths)
    return _call_window_scores(backend, q_window, keys, lengths)


def h2o_backend(impl: str, dtype, head_dim: int, group: int) -> str:
    """The back-end of H2O's chunk scores for `impl` at this shape class (`choose`); prefill runs the
    reference itself, query block by query block, when this is "xla"."""
    return choose("h2o_scores", impl, ShapeClass(jnp.dtype(dtype).name, head_dim, group))


def h2o_chunk_scores(q_chunk: jax.Array, keys: jax.Array, lse: jax.Array, lengths: jax.Array, start,
                     backend: str) -> jax.Array:
    """H2O's chunk scores `[B, H, T]` float32 (h2o_scores.py's contract) on `backend`, a result of
    `h2o_backend`. q_chunk `[B, H, c, D]`, keys `[B, K, T, D]`, lse `[B, H, c]` (the kernels' input; the
    reference recomputes it), lengths `[B]`, start the chunk's first position."""
    if backend == "xla":
        return chunk_scores_reference(q_chunk, keys, lengths, start)
    return _call_h2o_scores(backend, q_chunk, keys, lse, lengths, start)
