"""GPU kernels in Pallas (Triton lowering), each beside its plain-`jnp` reference and run with
`interpret=True` by the CPU tests: `window_scores` (SnapKV's observation-window scores) and
`h2o_chunk_scores` (H2O's key scores of one prompt chunk)."""

from snapkv_jax.pallas.common import supported_head_dim
from snapkv_jax.pallas.h2o_scores import chunk_scores_reference, h2o_chunk_scores
from snapkv_jax.pallas.window_scores import window_scores, window_scores_reference

__all__ = ["chunk_scores_reference", "h2o_chunk_scores", "supported_head_dim", "window_scores",
           "window_scores_reference"]
