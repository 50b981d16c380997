"""Probe: the two tiling defaults chosen on an H200 on 2026-12-03, measured as they were chosen.

  grid    the Mosaic window-score kernel's device time per call (a `jax.profiler` trace: the kernels' own
          timestamps, no host dispatch; `bench_common.device_times`) for `programs` in --programs, at
          16K / 32K / 128K / 1M tokens, GQA 32/8 and 32/32 heads (bf16, w = 32, D = 128, batch 1; inputs
          rotate over enough copies to overflow the L2 cache). `window_scores_mosaic._TARGET_PROGRAMS`
          came from it.
  groups  `extend` of a 64-token question onto a 32K-token shared context (Llama-2-7B shape, random bf16
          weights; full and SnapKV C=1024 contexts as bench_shared_context.py builds them): wall ms per
          call (median of 10, blocking) with `extend.LAYERS_PER_PROGRAM` at each of --sizes, the sizes
          alternated --rounds times so that drift over the run hits each alike. `LAYERS_PER_PROGRAM`
          came from it.

    PYTHONPATH=$PWD python3 experiments/probe_tiling.py grid --out $OUT
    PYTHONPATH=$PWD python3 experiments/probe_tiling.py groups --out $OUT
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from bench_shared_context import context_cache  # noqa: E402
from bench_snapkv_kernel import copies, make_inputs, traffic  # noqa: E402

import snapkv_jax as sk  # noqa: E402
from snapkv_jax.generate import extend  # noqa: E402
from snapkv_jax.pallas import window_scores_mosaic  # noqa: E402

# The module, whose LAYERS_PER_PROGRAM the probe sets (`snapkv_jax.extend`, the attribute, is the function).
segment = importlib.import_module("snapkv_jax.extend")
SHAPES = {"gqa 32/8": (32, 8), "32/32": (32, 32)}


def grid(args) -> tuple[dict, str]:
    rows = []
    for name, (heads, kv_heads) in SHAPES.items():
        for tokens in args.tokens:
            two_pass, _ = traffic(heads, kv_heads, tokens)
            inputs = [(q, k, l) for q, k, _, l in copies(lambda i: make_inputs(heads, kv_heads, tokens, i), two_pass)]
            row = dict(shape=name, tokens=tokens)
            for programs in args.programs:
                fn = jax.jit(lambda q, k, l, p=programs: window_scores_mosaic.window_scores(q, k, l, programs=p))
                jax.block_until_ready(fn(*inputs[0]))
                row[programs] = bc.device_times(fn, inputs, 4 * len(inputs))["busy_s"]
            rows.append(row)
            print(row, flush=True)
            del inputs
    lines = ["| shape | L | " + " | ".join(f"{p} programs" for p in args.programs) + " |",
             "|---|---|" + "---|" * len(args.programs)]
    lines += [f"| {r['shape']} | {r['tokens'] // 1024}K | " + " | ".join(f"{r[p] * 1e6:.1f}" for p in args.programs)
              + " |" for r in rows]
    return dict(rows=rows), "device us per call (both passes and the jnp steps between them)\n\n" + "\n".join(lines)


def groups(args) -> tuple[dict, str]:
    cfg = bc.with_positions(sk.ModelConfig.llama2_7b(), args.context + 4096)
    params = jax.block_until_ready(bc.random_params(cfg))
    question = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 64)).astype(np.int32)
    rows, default = [], segment.LAYERS_PER_PROGRAM
    for mode, held in (("full", args.context), ("snapkv", args.capacity)):
        ctx = context_cache(cfg, held, args.context)
        walls = {size: [] for size in args.sizes}
        for _ in range(args.rounds):
            for size in args.sizes:
                segment.LAYERS_PER_PROGRAM = size
                call = lambda: extend(params, cfg, None, question, context=ctx)[0]  # noqa: E731
                walls[size].append(bc.timed(call, reps=10, warmup=2) * 1e3)
        rows += [dict(context=mode, layers_per_program=size, wall_ms=walls[size]) for size in args.sizes]
        print(rows[-len(args.sizes):], flush=True)
        del ctx
    segment.LAYERS_PER_PROGRAM = default
    lines = ["| context | layers per program | wall ms per round (median of 10 each) | median |", "|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['layers_per_program']} | {' / '.join(f'{w:.2f}' for w in r['wall_ms'])} | "
              f"{statistics.median(r['wall_ms']):.2f} |" for r in rows]
    return dict(rows=rows), "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("grid", "groups"))
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--programs", type=int, nargs="+", default=[1024, 512, 256, 192, 128])
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 131072, 1 << 20])
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 8], help="groups: layers per program")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--capacity", type=int, default=1024)
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu":
        p.error("a GPU probe: the grid's kernels are Hopper's and its times come from the GPU's trace")
    result, table = grid(args) if args.what == "grid" else groups(args)
    stamp = bc.stamp()
    table = f"{args.what}: {stamp['device']}, jax {stamp['jax']}, {stamp['date']}\n`{stamp['command']}`\n\n{table}"
    bc.write(args.out, f"probe_tiling_{args.what}", stamp | result, table)
    print(table)


if __name__ == "__main__":
    main()
