"""Benchmark: decode-time compression's per-token cost (Llama-2-7B shape, bf16, random weights, batch 1).

Two jitted decode loops generate `--tokens` tokens after a SnapKV C=1024 prompt cache: plain decoding
(the cache grows to C + tokens slots) and `decode_compress=SnapKV(C)` with `interval` 128 (the cache stays
at C + 128 slots and every 128 tokens each layer re-selects C slots). The figure is the amortized ms per
token of the second over the first, both measured in this run, next to each loop's read roofline (weights
+ the mean live K/V over the read-stream bandwidth of the same run).

    PYTHONPATH=$PWD python3 experiments/bench_decode_compress.py --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from bench_shared_context import context_cache, read_bandwidth, weight_bytes  # noqa: E402

import snapkv_jax as sk  # noqa: E402
from snapkv_jax import cache as kv  # noqa: E402
from snapkv_jax.generate import _decode_loop_program  # noqa: E402


def loop_seconds(params, cfg, cache, tokens, method, interval, reps):
    program = _decode_loop_program()
    logits = jnp.zeros((1, cfg.vocab_size), jnp.float32)

    def run():
        fresh = jax.tree_util.tree_map(jnp.copy, cache)  # the loop donates its cache on the GPU
        return program(params, logits, fresh, None, np.int32(tokens), np.uint32(0), np.float32(1e-6),
                       np.float32(1.0), np.int32(-1), cfg=cfg, budget=tokens, greedy=True, top_k=0,
                       use_top_p=False, decode_compress=method, interval=interval if method else 0).tokens

    copy_s = bc.timed(lambda: jax.tree_util.tree_map(jnp.copy, cache), reps=reps)
    return bc.timed(run, reps=reps, warmup=1) - copy_s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--quick", action="store_true", help="2 layers, C=128, 64 tokens (runs on CPU)")
    p.add_argument("--prompt", type=int, default=16384)
    p.add_argument("--capacity", type=int, default=1024)
    p.add_argument("--interval", type=int, default=128)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    cfg = bc.with_positions(sk.ModelConfig.llama2_7b(), args.prompt + args.tokens + 1)
    read_elements = 1 << 32
    if args.quick:
        cfg = dataclasses.replace(cfg, num_layers=2)
        args.capacity, args.interval, args.tokens, args.reps, read_elements = 128, 32, 96, 1, 1 << 24
    params = bc.random_params(cfg)
    read_bw = read_bandwidth(read_elements)
    method = sk.SnapKV(capacity=args.capacity)
    prompt = context_cache(cfg, args.capacity, args.prompt)
    rows = []
    for name, m, extra in (("plain", None, args.tokens), ("decode_compress", method, args.interval)):
        cache = kv.widen(prompt, extra)
        seconds = loop_seconds(params, cfg, cache, args.tokens, m, args.interval, args.reps)
        live = args.capacity + (args.tokens / 2 if m is None else args.interval / 2)   # mean live slots
        kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * live
        floor = (weight_bytes(params) + kv_bytes) / read_bw
        rows.append(dict(loop=name, slots=cache.slots, ms_per_token=seconds / args.tokens * 1e3,
                         roofline_ms=floor * 1e3, of_roofline=seconds / args.tokens / floor))
        print(rows[-1], flush=True)
    ratio = rows[1]["ms_per_token"] / rows[0]["ms_per_token"]
    result = bc.stamp() | dict(model=bc.llama2_label(args.quick),
                               capacity=args.capacity, interval=args.interval, tokens=args.tokens,
                               read_bandwidth_Bps=read_bw, rows=rows, decode_compress_vs_plain=ratio)
    lines = [f"Decode-time compression, {result['model']}, bf16, batch 1, SnapKV C={args.capacity}, "
             f"interval {args.interval}, {args.tokens} tokens; {result['device']}, jax {result['jax']}, {result['date']}",
             f"read stream {read_bw / 1e12:.2f} TB/s (same run)", "",
             "| loop | slots | ms/token | read roofline ms | x roofline |", "|---|---|---|---|---|"]
    lines += [f"| {r['loop']} | {r['slots']} | {r['ms_per_token']:.3f} | {r['roofline_ms']:.3f} | {r['of_roofline']:.2f} |"
              for r in rows]
    lines.append(f"\ndecode_compress / plain per token: {ratio:.3f} (goal <= 1.10)")
    table = "\n".join(lines)
    bc.write(args.out, "decode_compress_quick" if args.quick else "decode_compress", result, table)
    print(table)


if __name__ == "__main__":
    main()
