"""What the kernels share (snapkv_jax/pallas/common.py): the online max of a row that has seen no key,
and the merge of per-chunk log-sum-exps."""

import math

import jax.numpy as jnp
import numpy as np

from snapkv_jax.pallas.common import MASK, merge_partial_lse, seen_max


def test_a_row_that_saw_no_key_keeps_l_zero_under_a_fused_multiply_add():
    """All of such a row's logits are MASK. A compiler that fuses `s * scale - m * scale` into
    fma(s, scale, -round(m * scale)) leaves the rounding error of one product (float64 stands in for the
    FMA's unrounded product here): huge, and for this scale positive, so exp2 overflows and l becomes
    infinite (the NaN the Mosaic kernel gave on an H200). Subtracting seen_max(m) * scale = 0 instead
    leaves exp2(MASK * scale) = 0."""
    scale = np.float32(math.log2(math.e) / math.sqrt(128))
    m = np.float32(MASK)
    fused = np.float64(m) * np.float64(scale) - np.float64(m * scale)
    with np.errstate(over="ignore"):
        assert fused > 1e29 and np.isinf(np.exp2(np.float32(fused)))
    offset = np.asarray(seen_max(jnp.float32(m)))
    assert offset == 0
    assert np.exp2(np.float32(np.float64(m) * np.float64(scale) - np.float64(offset * scale))) == 0
    assert np.asarray(seen_max(jnp.float32(3.5))) == np.float32(3.5)


def test_merge_ignores_chunks_a_row_did_not_see():
    """Partials (m, l) of three chunks of one row, the middle one unseen (MASK, 0): the merged base-2
    log-sum-exp equals that of the logits of the other two; a row that saw no chunk gets 0."""
    scale = math.log2(math.e) / 8
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal(5).astype(np.float32) * 4, rng.standard_normal(7).astype(np.float32) * 4]
    m = [float(x.max()) for x in logits]
    l = [float(np.exp2((x - mx) * scale).sum()) for x, mx in zip(logits, m)]
    ms = jnp.asarray([[m[0], MASK, m[1]], [MASK, MASK, MASK]], jnp.float32)
    ls = jnp.asarray([[l[0], 0.0, l[1]], [0.0, 0.0, 0.0]], jnp.float32)
    got = np.asarray(merge_partial_lse(ms, ls, scale, axis=1))
    everything = np.concatenate(logits).astype(np.float64) * scale
    want = np.log2(np.exp2(everything - everything.max()).sum()) + everything.max()
    np.testing.assert_allclose(got[0], want, rtol=1e-6)
    assert got[1] == 0
