"""Benchmark: one decode step of the Llama-2-7B shape (bf16, batch 1) against the HBM roofline, with a
SnapKV cache (C=1024) and with the full cache at 16K and 32K prompt tokens (DESIGN section 7).

Decode is memory-bound: each step must read every weight once (the LM head in full, one embedding row)
and every live K/V slot once. Roofline time = those bytes / a ceiling measured in the same run: the read
stream (`jnp.sum` over `--stream-gib` GiB of bf16, the traffic a decode step has: reads and a tiny write)
and, beside it, the copy (`x * 2` over the same array, read + write counted), as the kernel bench measures
both. Figures before 2026-12-03 were against a copy of 512 MiB (`-x`).
The cache is filled with random K/V directly (prefill is benchmarked in bench_snapkv_kernel.py); random
weights are fine for speed. Steps run through the donated jitted `decode_step`, so XLA updates the cache
in place; each timed repetition runs `--steps` steps back to back and is divided by `--steps`.

    PYTHONPATH=$PWD python3 experiments/bench_decode.py --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from bench_snapkv_kernel import stream_ceilings  # noqa: E402  (same ceiling measurement as the kernel bench)

from snapkv_jax.cache import KVCache  # noqa: E402
from snapkv_jax.config import ModelConfig  # noqa: E402
from snapkv_jax.generate import _decode_donated  # noqa: E402


def filled_cache(cfg: ModelConfig, held: int, slots: int, next_pos: int, seed: int, batch: int = 1) -> KVCache:
    """A cache whose first `held` slots of every row hold random K/V; `next_pos` is the prompt length."""
    shape = (batch, cfg.num_kv_heads, slots, cfg.head_dim)
    keys = jax.random.split(jax.random.key(seed), 2 * cfg.num_layers)
    pos = jnp.where(jnp.arange(slots) < held, jnp.arange(slots), -1).astype(jnp.int32)
    pos = jnp.broadcast_to(pos, shape[:3])
    return KVCache(
        k=tuple(jax.random.normal(keys[2 * i], shape, jnp.bfloat16) for i in range(cfg.num_layers)),
        v=tuple(jax.random.normal(keys[2 * i + 1], shape, jnp.bfloat16) for i in range(cfg.num_layers)),
        pos=tuple(jnp.copy(pos) for _ in range(cfg.num_layers)),  # distinct buffers: each is donated
        end=jnp.full((batch,), held, jnp.int32), next_pos=jnp.full((batch,), next_pos, jnp.int32),
        lengths=jnp.full((batch,), next_pos, jnp.int32))


def step_bytes(cfg: ModelConfig, params, live_slots: int) -> int:
    """Fewest bytes one step must read: all weights but the embedding table (one row of it), plus K and V
    of every live slot in every layer."""
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    embed = params["embed"]["embedding"]
    weights += embed.nbytes // embed.shape[0] - embed.nbytes
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * live_slots * cfg.head_dim * 2
    return weights + kv


def time_decode(cfg, params, held, next_pos, args) -> float:
    """Median seconds per decode step over `args.reps` runs of `args.steps` steps."""
    slots = held + args.steps * (args.reps + 1)
    cache = filled_cache(cfg, held, slots, next_pos, seed=held)
    token = jnp.array([7], jnp.int32)
    logits, cache = _decode_donated(params, token, cache, cfg=cfg)           # compile + warm up
    for _ in range(args.steps - 1):
        logits, cache = _decode_donated(params, token, cache, cfg=cfg)
    jax.block_until_ready(logits)
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        for _ in range(args.steps):
            logits, cache = _decode_donated(params, token, cache, cfg=cfg)
        jax.block_until_ready((logits, cache))
        times.append((time.perf_counter() - start) / args.steps)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--quick", action="store_true", help="a 2-layer model at 1K/2K tokens (runs on CPU)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--inner", type=int, default=5, help="ceiling timing repetitions per rep")
    p.add_argument("--stream-gib", type=float, default=8.0, help="array size of the stream ceilings")
    p.add_argument("--capacity", type=int, default=1024)
    p.add_argument("--lengths", type=int, nargs="*", default=[16384, 32768])
    p.add_argument("--tag", default="", help="appended to the output files' names (e.g. which XLA_FLAGS)")
    p.add_argument("--fused", action="store_true", help="time the fused layout (sk.fuse_projections)")
    args = p.parse_args(argv)
    cfg = dataclasses.replace(ModelConfig.llama2_7b(), max_position_embeddings=1 << 20)
    if args.quick:
        cfg = dataclasses.replace(cfg, num_layers=2)
        args.lengths, args.capacity, args.steps, args.reps = [1024, 2048], 256, 4, 3
    read_bw, copy_bw = stream_ceilings(args)  # before the weights exist: its 8 GiB arrays then fit whole
    params = jax.block_until_ready(bc.random_params(cfg, fused=args.fused))  # no float32 or unfused copy
    rows = []
    for length in args.lengths:
        for mode, held in (("full", length), ("snapkv", args.capacity)):
            seconds = time_decode(cfg, params, held, length, args)
            read_floor, copy_floor = (step_bytes(cfg, params, held) / bw for bw in (read_bw, copy_bw))
            rows.append(dict(prompt_tokens=length, mode=mode, held_slots=held, step_ms=seconds * 1e3,
                             read_roofline_ms=read_floor * 1e3, of_read_roofline=seconds / read_floor,
                             copy_roofline_ms=copy_floor * 1e3, of_copy_roofline=seconds / copy_floor))
            print(rows[-1], flush=True)
    for r in rows:
        full = next(f for f in rows if f["prompt_tokens"] == r["prompt_tokens"] and f["mode"] == "full")
        r["speedup_vs_full"] = full["step_ms"] / r["step_ms"]
    result = dict(bc.stamp(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                  model=bc.llama2_label(args.quick, args.fused), batch=1,
                  dtype="bfloat16", stream_gib=args.stream_gib, read_bandwidth_Bps=read_bw,
                  copy_bandwidth_Bps=copy_bw, rows=rows)
    lines = [f"Decode step, {result['model']}, bf16, batch 1; {result['device']}, jax {result['jax']}, "
             f"{result['date']}; XLA_FLAGS={result['xla_flags'] or 'none'}",
             f"read stream {read_bw / 1e12:.2f} TB/s, copy {copy_bw / 1e12:.2f} TB/s "
             f"(read + write counted), both in this run", "",
             "| prompt | cache | slots held | step ms | read roofline ms | x read roofline | x copy roofline "
             "| speed-up vs full |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['prompt_tokens']} | {r['mode']} | {r['held_slots']} | {r['step_ms']:.3f} | "
              f"{r['read_roofline_ms']:.3f} | {r['of_read_roofline']:.2f} | {r['of_copy_roofline']:.2f} | "
              f"{r['speedup_vs_full']:.2f} |" for r in rows]
    stem = ("decode_bench_quick" if args.quick else "decode_bench") + (f"_{args.tag}" if args.tag else "")
    bc.write(args.out, stem, result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
