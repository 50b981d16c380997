"""Benchmark: batch throughput at 16K and 32K prompt tokens, full cache vs SnapKV C=1024 (issue "Long
context at scale", item 5), Llama-2-7B shape, random bf16 weights, one GPU.

For each case the batch is the largest whose decode cache (every layer, prompt + 128 new tokens) fits
beside the weights and one sub-batch's prefill (memory.py's estimate, the same one `prefill` checks),
backed off by 10% when the allocation fails anyway. Measured in this process:
  * decode: `decode_step` (donated) on a cache of that batch filled with random K/V, median of 3 x 16
    steps -> decode tokens/s = batch / step time;
  * prefill: `sk.prefill` of one sub-batch (the most rows whose prefill activations fit; 1 for the full
    cache), median of 2 -> per-row prefill time. Prefill of the whole batch is that many sub-batches run
    one after another, so end-to-end tokens/s = batch x 128 / (sub-batches x sub-batch prefill + 128
    steps). The sub-batch prefill is measured; its multiple is computed, not run (a 100-row batch of 32K
    prompts is minutes of prefill), and the table says so.

    PYTHONPATH=$PWD python3 experiments/bench_throughput.py --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import snapkv_jax as sk
from experiments import bench_common as bc
from experiments.bench_decode import filled_cache
from snapkv_jax import layer_prefill, memory
from snapkv_jax.generate import _decode_donated, plan_prefill

NEW_TOKENS = 128


def row_cache_bytes(cfg, slots: int) -> int:
    return cfg.num_layers * cfg.num_kv_heads * slots * (2 * cfg.head_dim * 2 + 4)


def prefill_rows_that_fit(cfg, params, tokens, compress, free, cache_bytes_per_row) -> int:
    """The most rows one prefill may take when the rest of the batch's caches are resident."""
    rows = 1
    while rows < 64:
        prompt = np.zeros((rows * 2, tokens), np.int32)
        plan = plan_prefill(params, cfg, prompt, compress, "auto", NEW_TOKENS, None)
        if layer_prefill.estimate_peak(cfg, plan, rows * 2, 2, compress, "cudnn") > 0.3 * free:
            break
        rows *= 2
    return rows


def decode_step_s(cfg, params, batch, held, tokens) -> float:
    cache = filled_cache(cfg, held, held + NEW_TOKENS, tokens, seed=batch, batch=batch)
    token = jnp.full((batch,), 7, jnp.int32)
    logits, cache = _decode_donated(params, token, cache, cfg=cfg)
    jax.block_until_ready(logits)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(16):
            logits, cache = _decode_donated(params, token, cache, cfg=cfg)
        jax.block_until_ready((logits, cache))
        times.append((time.perf_counter() - start) / 16)
    return statistics.median(times)


def case(cfg, params, tokens, method) -> dict:
    compress = None if method == "full" else sk.SnapKV(capacity=1024)
    held = tokens if compress is None else 1024
    per_row = row_cache_bytes(cfg, held + NEW_TOKENS)
    free = memory.free_bytes()
    sub = 1 if compress is None else prefill_rows_that_fit(cfg, params, tokens, compress, free, per_row)
    plan = plan_prefill(params, cfg, np.zeros((sub, tokens), np.int32), compress, "auto", NEW_TOKENS, None)
    prefill_peak = layer_prefill.estimate_peak(cfg, plan, sub, 2, compress, "cudnn")
    batch = max(1, int((0.92 * free - prefill_peak) // per_row))
    row = dict(tokens=tokens, method=method, prefill_rows=sub, per_row_cache_gib=per_row / bc.GIB)
    while True:
        try:
            row["step_s"] = decode_step_s(cfg, params, batch, held, tokens)
            break
        except Exception as e:  # XLA out of memory despite the estimate: back off
            if batch == 1 or "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            batch = max(1, int(batch * 0.9))
            gc.collect()
    gc.collect()
    prompt = np.random.default_rng(tokens).integers(0, cfg.vocab_size, (sub, tokens), dtype=np.int32)
    row["prefill_sub_batch_s"] = bc.timed(
        lambda: sk.prefill(params, cfg, prompt, compress=compress, max_slots=held + NEW_TOKENS), reps=2)
    sub_batches = -(-batch // sub)
    row.update(batch=batch, sub_batches=sub_batches, decode_tokens_per_s=batch / row["step_s"])
    total = sub_batches * row["prefill_sub_batch_s"] + NEW_TOKENS * row["step_s"]
    row["end_to_end_tokens_per_s"] = batch * NEW_TOKENS / total
    print(row, flush=True)
    return row


def table(result) -> str:
    lines = [f"Throughput, Llama-2-7B shape, {result['device']}, jax {result['jax']}, {result['date']}; "
             f"{NEW_TOKENS} new tokens per row; command `{result['command']}`", "",
             "| T | cache | batch | decode step ms | decode tokens/s | prefill rows x sub-batches | "
             "sub-batch prefill s (measured) | end-to-end tokens/s (computed) |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['tokens'] // 1024}K | {r['method']} | {r['batch']} | {r['step_s'] * 1e3:.2f} | "
                     f"{r['decode_tokens_per_s']:.0f} | {r['prefill_rows']} x {r['sub_batches']} | "
                     f"{r['prefill_sub_batch_s']:.2f} | {r['end_to_end_tokens_per_s']:.0f} |")
    for tokens in sorted({r["tokens"] for r in result["rows"]}):
        by = {r["method"]: r for r in result["rows"] if r["tokens"] == tokens}
        if len(by) == 2:
            lines.append(f"\n{tokens // 1024}K: SnapKV / full cache = "
                         f"{by['snapkv']['decode_tokens_per_s'] / by['full']['decode_tokens_per_s']:.1f}x decode, "
                         f"{by['snapkv']['end_to_end_tokens_per_s'] / by['full']['end_to_end_tokens_per_s']:.1f}x "
                         f"end to end")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--out", default="experiments/results")
    args = p.parse_args(argv)
    cfg = bc.with_positions(bc.shapes()["llama2-7b"], max(args.lengths) + NEW_TOKENS)
    params = bc.random_params(cfg)
    result = dict(bc.stamp(), rows=[])
    for tokens in args.lengths:
        for method in ("full", "snapkv"):
            result["rows"].append(case(cfg, params, tokens, method))
            bc.write(args.out, "throughput", result)
    text = table(result)
    bc.write(args.out, "throughput", result, text)
    print(text)


if __name__ == "__main__":
    main()
