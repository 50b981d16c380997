"""Probe: is the window-score kernel's time at 16K-128K device work or per-call overhead?

Times `window_scores` (bf16, w=32, D=128, batch 1) two ways in one run: the kernel bench's way (back-to-back
jitted calls ended by `block_until_ready`) and eight calls on eight input sets inside one jit (device time
and launch gaps only, no host dispatch); at GQA 32/8 and 32K also a few tilings inside one jit. Prints JSON
lines; the finding is in experiments/results/snapkv_kernel_notes.md.

    PYTHONPATH=$PWD python3 experiments/probe_kernel_timing.py
"""

import argparse
import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_snapkv_kernel import HEAD_DIM, WINDOW, copy_bandwidth, make_inputs, timed  # noqa: E402

from snapkv_jax.pallas.window_scores_triton import window_scores  # noqa: E402

SETS = 8
TILINGS = [dict(programs=256), dict(programs=512), dict(programs=2048), dict(num_warps=8), dict(block_k=32)]


def main():
    args = argparse.Namespace(quick=False, reps=20, inner=5)
    bandwidth = copy_bandwidth(args)
    print(json.dumps(dict(device=jax.devices()[0].device_kind, copy_bandwidth_Bps=bandwidth)))
    for heads, kv_heads in ((32, 8), (32, 32)):
        for tokens in (16384, 32768, 65536, 131072):
            sets = (make_inputs(heads, kv_heads, tokens, i) for i in range(SETS))
            inputs = [(q, k, l) for q, k, _, l in sets]
            per_call = timed(jax.jit(window_scores), inputs, args.reps, args.inner)
            in_jit = {}
            for tiling in [{}] + (TILINGS if (kv_heads, tokens) == (8, 32768) else []):
                many = jax.jit(lambda xs, t=tuple(tiling.items()): [window_scores(*x, **dict(t)) for x in xs])
                in_jit[str(tiling or "default")] = timed(many, [(inputs,)], args.reps, 1) / SETS
            moved = 2 * kv_heads * tokens * HEAD_DIM * 2 + heads * WINDOW * HEAD_DIM * 2 + heads * tokens * 4
            print(json.dumps(dict(shape=f"{heads}/{kv_heads}", tokens=tokens, per_call_ms=per_call * 1e3,
                                  of_copy_bw_per_call=moved / per_call / bandwidth,
                                  in_jit_ms={k: v * 1e3 for k, v in in_jit.items()},
                                  of_copy_bw_in_jit=moved / in_jit["default"] / bandwidth)), flush=True)


if __name__ == "__main__":
    main()
