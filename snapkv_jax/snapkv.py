"""`sk.snapkv`: SnapKV's selection and its scoring steps under the names notebooks have used since the
first release. A facade, computing nothing itself: the method is `snapkv_jax.compression.snapkv`
(`SnapKV`, alias `SnapKVConfig`, and `select`), the scoring steps `snapkv_jax.compression.scoring`,
`gather_kept` `snapkv_jax.compression.base`, the window-score kernels `snapkv_jax.pallas`.
"""

from __future__ import annotations

from snapkv_jax.compression.base import gather_kept
from snapkv_jax.compression.scoring import (pool_scores, pooled_scores, reduce_gqa, resolve_impl,
                                            window_scores, window_scores_reference)
from snapkv_jax.compression.snapkv import SnapKV, SnapKVConfig, select, select_layer

__all__ = ["SnapKV", "SnapKVConfig", "gather_kept", "pool_scores", "pooled_scores", "reduce_gqa",
           "resolve_impl", "select", "select_layer", "window_scores", "window_scores_reference"]
