"""Benchmark: KVzip's prefill (arXiv 2505.23416, run layer-major: compression/kvzip.py) against plain
prefill and SnapKV's, in seconds and peak device memory (issue "Past the observation window", item 4).

For a shape (default Llama-2-7B), random bf16 weights, batch 1, and each prompt length: `sk.prefill` with
the full cache, SnapKV (C = 1024, w = 32) and KVzip (C = 1024, 4 sinks, reconstruction chunks of 2048),
each in a fresh process (the device's peak-memory counter never resets): median of `--reps` timed calls
after a compiling warm-up, then the peak bytes in use minus the weights, beside `memory.py`'s estimate.
KVzip's instruction is token ids of the paper's wording's length in the Llama-2 tokenizer (10 / 14 ids,
suffix 1): random weights have no tokenizer, and only the lengths matter for the cost.

Each time is set against its bound, measured in the parent process: matmul FLOPs at the measured bf16
matmul rate + attention FLOPs at the measured causal flash-attention rate. KVzip's bound adds its
reconstruction: N chunks of R tokens (N R ~ T + N x the instruction) through every linear layer, their
attention to the whole context (dense: 4 N R T H D per layer) and to themselves (causal), and the scores'
q.k over each chunk's sinks, chunk and own keys (a `jnp` einsum: matmul rate).

Goals (DESIGN section 7): KVzip prefill <= 2.2x plain prefill at 16K / 32K; peak memory <= SnapKV's plus
the reconstruction chunk's activations (not plus every layer's K/V).

    PYTHONPATH=$PWD python3 experiments/bench_kvzip.py --lengths 16384 --out $OUT   # GPU: llama2-7b, then 32768
    PYTHONPATH=$PWD python3 experiments/bench_kvzip.py --cpu-smoke --out /tmp/kz  # tiny shape, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import numpy as np

import snapkv_jax as sk
from experiments import bench_common as bc
from snapkv_jax import layer_prefill
from snapkv_jax.generate import plan_prefill

METHODS = ("full", "snapkv", "kvzip")
# Lengths of the paper's instruction texts and of "\n" in the Llama-2 tokenizer.
REPEAT_IDS, RESUME_IDS, SUFFIX_IDS = 10, 14, 1


def build(method: str, capacity: int, chunk: int, vocab: int):
    if method == "full":
        return None
    if method == "snapkv":
        return sk.SnapKV(capacity=capacity)
    ids = np.random.default_rng(0).integers(1, vocab, REPEAT_IDS + RESUME_IDS + SUFFIX_IDS).tolist()
    return sk.KVzip(capacity=capacity, sinks=4, chunk=chunk, repeat=ids[:REPEAT_IDS],
                    resume=ids[REPEAT_IDS:REPEAT_IDS + RESUME_IDS], suffix=ids[-SUFFIX_IDS:])


def case(args) -> dict:
    """One (length, method) in this process: seconds, peak bytes over the weights, estimate."""
    cfg = bc.with_positions(bc.shapes()[args.shape], args.tokens + 2 * args.reconstruct_chunk)
    params = bc.random_params(cfg)
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    jax.block_until_ready(params)
    compress = build(args.method, args.capacity, args.reconstruct_chunk, cfg.vocab_size)
    prompt = np.random.default_rng(args.tokens).integers(0, cfg.vocab_size, (1, args.tokens), dtype=np.int32)
    seconds = bc.timed(lambda: sk.prefill(params, cfg, prompt, compress=compress), reps=args.reps)
    peak = bc.peak_bytes()
    plan = plan_prefill(params, cfg, prompt, compress, "auto", 0, None)
    attention = bc.attention_implementation()
    return dict(shape=args.shape, tokens=args.tokens, method=args.method, seconds=seconds, chunk=plan.chunk,
                weights_bytes=weights, peak_bytes=peak,
                over_weights_bytes=None if peak is None else peak - weights,
                estimate_bytes=layer_prefill.estimate_peak(cfg, plan, 1, params["embed"]["embedding"].dtype.itemsize,
                                                           compress, attention),
                layout=None if compress is None or args.method != "kvzip" else list(compress.layout(args.tokens)))


def kvzip_bound_s(cfg, tokens: int, method, matmul_flops: float, attention_flops: float) -> float:
    """The reconstruction's FLOPs at the measured rates, on top of the prefill's bound."""
    matmul, attention = bc.kvzip_reconstruction_flops(cfg, tokens, method)
    return matmul / matmul_flops + attention / attention_flops


def _fresh(args, tokens: int, method: str) -> dict:
    argv = [sys.executable, "-m", "experiments.bench_kvzip", "--case", "--shape", args.shape, "--tokens",
            str(tokens), "--method", method, "--reps", str(args.reps), "--capacity", str(args.capacity),
            "--reconstruct-chunk", str(args.reconstruct_chunk)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        return dict(shape=args.shape, tokens=tokens, method=method, error=done.stderr[-1500:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    result = dict(bc.stamp(), capacity=args.capacity, reconstruct_chunk=args.reconstruct_chunk, rows=[])
    if args.cpu_smoke:  # ceilings at shapes a CPU measures in seconds
        result["matmul_flops"] = bc.matmul_rate(512)
        result["attention_flops"] = bc.attention_rate(1024, heads=4, kv_heads=2, d=16)
    else:
        result["matmul_flops"], result["attention_flops"] = bc.matmul_rate(), bc.attention_rate()
    cfg = bc.with_positions(bc.shapes()[args.shape], max(args.lengths) + 2 * args.reconstruct_chunk)
    kvzip = build("kvzip", args.capacity, args.reconstruct_chunk, cfg.vocab_size)
    for tokens in args.lengths:
        rows = {m: _fresh(args, tokens, m) for m in METHODS}
        prefill_bound = bc.prefill_bound_s(cfg, tokens, result["matmul_flops"], result["attention_flops"])
        for m, row in rows.items():
            row["bound_s"] = prefill_bound + (kvzip_bound_s(cfg, tokens, kvzip, result["matmul_flops"],
                                                            result["attention_flops"]) if m == "kvzip" else 0)
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
        bc.write(args.out, output_name(args), result)
    return result


def output_name(args) -> str:
    """kvzip_prefill_<shape>_<lengths>: one GPU call per length fits the device's per-command limit,
    and each writes its own file."""
    return f"kvzip_prefill_{args.shape}_" + "_".join(f"{t // 1024}k" if t % 1024 == 0 else str(t)
                                                      for t in args.lengths)


def _gib(x) -> str:
    return "n/a" if x is None else f"{x / bc.GIB:.2f}"


def table(result) -> str:
    lines = [f"KVzip prefill vs plain and SnapKV prefill (C={result['capacity']}, reconstruction chunk "
             f"{result['reconstruct_chunk']}), {result['device']}, jax {result['jax']}, {result['date']}, "
             f"batch 1, random bf16 weights", "",
             "| shape | T | method | prefill s | bound s | of bound | x plain | peak - weights GiB | estimate GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["shape"], r["tokens"], r["method"]): r for r in result["rows"]}
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['tokens']} | {r['method']} | error: see JSON | | | | | |")
            continue
        plain = by.get((r["shape"], r["tokens"], "full"), {}).get("seconds")
        ratio = f"{r['seconds'] / plain:.2f}" if plain else "n/a"
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['method']} | {r['seconds']:.3f} | {r['bound_s']:.3f} | "
                     f"{r['bound_s'] / r['seconds']:.0%} | {ratio} | {_gib(r['over_weights_bytes'])} | "
                     f"{_gib(r['estimate_bytes'])} |")
    lines += ["", "Goals: kvzip <= 2.2x plain; kvzip's peak - weights <= snapkv's + the reconstruction's "
              "activations (memory.py's estimate difference).", "", f"Command: `{result['command']}`"]
    return "\n".join(lines)


def main(argv=None):
    # The parent measures the ceilings and starts one process per case: with JAX's default preallocation
    # (75% of the device at first use) it would leave the cases a quarter of the memory. Peak figures are
    # bytes in use, which preallocation does not change.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama2-7b", choices=tuple(bc.shapes()))
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--capacity", type=int, default=1024)
    p.add_argument("--reconstruct-chunk", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="the tiny shape at 256 / 512 tokens, C=64, chunks of 128: checks the script in seconds")
    p.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(case(args)))
        return
    if args.cpu_smoke:
        args.shape, args.lengths, args.capacity, args.reconstruct_chunk, args.reps = "tiny", [256, 512], 64, 128, 1
    result = run(args)
    text = table(result)
    bc.write(args.out, output_name(args), result, text)
    print(text)


if __name__ == "__main__":
    main()
