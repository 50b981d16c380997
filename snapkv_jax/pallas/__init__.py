"""GPU kernels in Pallas, one file per kernel and back-end (`*_mosaic.py`: Mosaic GPU, Hopper and later;
`*_triton.py`: Triton lowering, Ampere and later) beside the one plain-`jnp` reference each is tested
against (`window_scores.py`, `h2o_scores.py`), run with `interpret=True` by the CPU tests (the Mosaic
ones need jax >= 0.11 for that); `dispatch.py` picks the back-end. Kernels: SnapKV's observation-window
scores and H2O's key scores of one prompt chunk.

`window_scores` and `h2o_chunk_scores` here are the Triton kernels, as this package first exported them
(absent on a jax without Pallas Triton); `dispatch.window_scores` picks a back-end.
"""

from snapkv_jax.pallas import dispatch
from snapkv_jax.pallas.common import supported_head_dim
from snapkv_jax.pallas.h2o_scores import chunk_scores_reference
from snapkv_jax.pallas.window_scores import window_scores_reference

__all__ = ["chunk_scores_reference", "dispatch", "supported_head_dim", "window_scores_reference"]

if dispatch.window_scores_triton is not None:
    from snapkv_jax.pallas.h2o_scores_triton import h2o_chunk_scores
    from snapkv_jax.pallas.window_scores_triton import window_scores
    __all__ += ["h2o_chunk_scores", "window_scores"]
