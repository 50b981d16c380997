"""Kernel back-end dispatch (snapkv_jax/pallas/dispatch.py): "auto" takes Mosaic GPU on Hopper and Triton
below it, falls back past a back-end that fails to lower (mosaic -> triton -> the `jnp` reference),
warning once per back-end and computing what the reference computes; an explicit impl raises.

A GPU is faked by patching `dispatch.gpu_capability` (the kernels still run in interpret mode on the CPU,
and probes lower them there); a back-end is broken by replacing its kernel with one whose primitive has
no lowering rule, so the failure comes out of `jax.jit(...).lower`, as a lowering failure on a GPU does.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Primitive

import snapkv_jax as sk
from snapkv_jax.pallas import (dispatch, h2o_scores_mosaic, h2o_scores_triton, window_scores_mosaic,
                               window_scores_triton)
from tests.test_pallas_window_scores import unavailable

MOSAIC_UNAVAILABLE = unavailable("mosaic")  # on the real device, before any test fakes a GPU
_broken = Primitive("broken_kernel")
_broken.def_abstract_eval(lambda q, k: jax.core.ShapedArray((q.shape[0], q.shape[1], k.shape[2]), jnp.float32))


def broken_kernel(q, keys, *args, **kwargs):
    """A kernel that traces but cannot lower: `[B, H, T]` float32 of an unknown primitive."""
    return _broken.bind(q, keys)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A Hopper GPU as dispatch sees it (Mosaic, then Triton, for both kernels: `dispatch.HOPPER_BACKENDS`),
    fresh verdicts and warnings and no compiled programs."""
    monkeypatch.setattr(dispatch, "gpu_capability", lambda: (9, 0))
    monkeypatch.setattr(dispatch, "_VERDICTS", {})
    monkeypatch.setattr(dispatch, "_WARNED", set())
    jax.clear_caches()
    yield
    jax.clear_caches()


def example(group=2, seed=0):
    rng = np.random.default_rng(seed)
    snap = sk.SnapKV(window=8, capacity=24, kernel=3)
    q = jnp.asarray(rng.standard_normal((2, 2 * group, 8, 16)), jnp.float32)     # [B, H, w, D]
    keys = jnp.asarray(rng.standard_normal((2, 2, 64, 16)), jnp.float32)       # [B, K, T, D]
    return q, keys, jnp.asarray([64, 41], jnp.int32), snap


def fallback_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "snapkv_jax" in str(w.message)]


def test_auto_is_the_reference_off_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU 'auto' picks a kernel")
    assert dispatch.resolve_impl("auto", 128) == "xla"
    assert dispatch.choose("window_scores", "auto", dispatch.ShapeClass("float32", 128, 4, 32)) == "xla"


@pytest.mark.parametrize("kernel, shape", [("window_scores", dispatch.ShapeClass("bfloat16", 64, 4, 32)),
                                           ("h2o_scores", dispatch.ShapeClass("float32", 16, 2))])
def test_auto_takes_triton_below_hopper_when_its_probe_compiles(fake_gpu, monkeypatch, kernel, shape):
    monkeypatch.setattr(dispatch, "gpu_capability", lambda: (8, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert dispatch.choose(kernel, "auto", shape) == "triton"
    assert dispatch._VERDICTS == {(kernel, "triton", shape): None}


@pytest.mark.parametrize("kernel, shape", [("window_scores", dispatch.ShapeClass("bfloat16", 64, 4, 32)),
                                           ("h2o_scores", dispatch.ShapeClass("float32", 64, 2))])
def test_auto_takes_mosaic_on_hopper_when_its_probe_compiles(fake_gpu, kernel, shape):
    if MOSAIC_UNAVAILABLE:
        pytest.skip(f"the Mosaic probe cannot run here: {MOSAIC_UNAVAILABLE}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert dispatch.choose(kernel, "auto", shape) == "mosaic"
    assert dispatch._VERDICTS == {(kernel, "mosaic", shape): None}


def test_auto_falls_back_from_mosaic_to_triton_with_one_warning(fake_gpu, monkeypatch):
    monkeypatch.setattr(window_scores_mosaic, "window_scores", broken_kernel)
    shape = dispatch.ShapeClass("bfloat16", 64, 4, 32)
    with pytest.warns(RuntimeWarning, match="mosaic back-end of window_scores .*broken_kernel.*using triton") as record:
        assert dispatch.choose("window_scores", "auto", shape) == "triton"
        assert dispatch.choose("window_scores", "auto", shape._replace(group=2)) == "triton"  # no second warning
    assert len(fallback_warnings(record)) == 1


def test_auto_falls_back_to_the_reference_with_one_warning_per_backend(fake_gpu, monkeypatch):
    monkeypatch.setattr(window_scores_mosaic, "window_scores", broken_kernel)
    monkeypatch.setattr(window_scores_triton, "window_scores", broken_kernel)
    q, keys, lengths, snap = example()
    want = np.asarray(sk.snapkv.select(q, keys, lengths, snap, impl="xla"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = np.asarray(sk.snapkv.select(q, keys, lengths, snap, impl="auto"))
        q4, keys4, lengths4, _ = example(group=4, seed=1)  # another shape class: probed again, silently
        sk.snapkv.select(q4, keys4, lengths4, snap, impl="auto")
    np.testing.assert_array_equal(got, want)
    mosaic, triton = (str(w.message) for w in fallback_warnings(record))
    assert "mosaic back-end of window_scores" in mosaic and "broken_kernel" in mosaic and "using triton" in mosaic
    assert "triton back-end of window_scores" in triton and "broken_kernel" in triton and "using xla" in triton


def test_a_backend_failing_for_both_kernels_warns_once(fake_gpu, monkeypatch):
    monkeypatch.setattr(window_scores_mosaic, "window_scores", broken_kernel)
    monkeypatch.setattr(h2o_scores_mosaic, "h2o_chunk_scores", broken_kernel)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert dispatch.choose("window_scores", "auto", dispatch.ShapeClass("bfloat16", 64, 4, 32)) == "triton"
        assert dispatch.choose("h2o_scores", "auto", dispatch.ShapeClass("bfloat16", 64, 4)) == "triton"
    [warned] = fallback_warnings(record)
    assert "mosaic back-end of window_scores" in str(warned.message)


def test_explicit_h2o_impl_raises_when_its_backend_fails(fake_gpu, monkeypatch):
    monkeypatch.setattr(h2o_scores_mosaic, "h2o_chunk_scores", broken_kernel)
    with pytest.raises(RuntimeError, match="impl='mosaic': the mosaic kernel for h2o_scores cannot run here"):
        dispatch.choose("h2o_scores", "mosaic", dispatch.ShapeClass("bfloat16", 64, 4))


@pytest.mark.parametrize("impl, broken", [("triton", ("triton",)), ("mosaic", ("mosaic",)),
                                          ("pallas", ("mosaic", "triton"))])
def test_explicit_impl_raises_when_its_backend_fails(fake_gpu, monkeypatch, impl, broken):
    modules = {"mosaic": window_scores_mosaic, "triton": window_scores_triton}
    for backend in broken:
        monkeypatch.setattr(modules[backend], "window_scores", broken_kernel)
    q, keys, lengths, snap = example()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "pallas" warns for mosaic before raising for triton
        with pytest.raises(RuntimeError, match=f"impl='{impl}': the {broken[-1]} kernel for window_scores cannot "
                                               "run here: NotImplementedError: .*broken_kernel"):
            sk.snapkv.select(q, keys, lengths, snap, impl=impl)


def test_a_backend_that_does_not_import_is_skipped_or_named(fake_gpu, monkeypatch):
    monkeypatch.setattr(dispatch, "window_scores_triton", None)
    monkeypatch.setattr(dispatch, "_TRITON_MISSING", "jax.experimental.pallas.triton does not import")
    monkeypatch.setattr(dispatch, "window_scores_mosaic", None)
    monkeypatch.setattr(dispatch, "_MOSAIC_MISSING", "jax.experimental.pallas.mosaic_gpu does not import")
    q, keys, lengths, snap = example()
    for impl in ("triton", "mosaic"):
        with pytest.raises(RuntimeError, match=f"pallas.{impl}\\w* does not import"):
            sk.snapkv.select(q, keys, lengths, snap, impl=impl)
    with pytest.warns(RuntimeWarning, match="triton does not import"):  # mosaic is not even a candidate
        got = sk.snapkv.select(q, keys, lengths, snap, impl="auto")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(sk.snapkv.select(q, keys, lengths, snap, impl="xla")))


def test_h2o_prefill_falls_back_inside_the_layer_program(fake_gpu, monkeypatch):
    monkeypatch.setattr(h2o_scores_mosaic, "h2o_chunk_scores", broken_kernel)
    monkeypatch.setattr(h2o_scores_triton, "h2o_chunk_scores", broken_kernel)
    cfg = sk.ModelConfig.tiny()
    params = sk.init_params(cfg, jax.random.key(0))
    tokens = np.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 48)), np.int32)
    lengths = np.array([48, 33], np.int32)
    method = sk.H2O(capacity=20, window=4)
    _, want = sk.prefill(params, cfg, tokens, lengths, compress=method, chunk=16, snap_impl="xla")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, got = sk.prefill(params, cfg, tokens, lengths, compress=method, chunk=16, snap_impl="auto")
    assert [f"{b} back-end of h2o_scores" in str(w.message) for w, b in zip(fallback_warnings(record),
                                                                            ("mosaic", "triton"))] == [True, True]
    for a, b in zip(got.pos, want.pos):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mosaic_is_refused_below_hopper(monkeypatch):
    monkeypatch.setattr(dispatch, "gpu_capability", lambda: (8, 0))
    with pytest.raises(ValueError, match="compute capability >= 9.0.*8.0"):
        dispatch.resolve_impl("mosaic", 128)
    assert dispatch.kernel_order("window_scores", (8, 0)) == ("triton",)


@pytest.mark.parametrize("kernel", ["window_scores", "h2o_scores"])
def test_auto_tries_the_mosaic_kernels_first_on_hopper_and_later(monkeypatch, kernel):
    assert dispatch.kernel_order(kernel, (9, 0)) == dispatch.kernel_order(kernel, (10, 0)) == ("mosaic", "triton")
    monkeypatch.setattr(dispatch, f"{kernel}_mosaic", None)  # a jax without Pallas Mosaic GPU
    assert dispatch.kernel_order(kernel, (9, 0)) == ("triton",)
