"""Benchmark: each compression method's prefill time next to SnapKV's, in one run (issue "Compression
methods beside SnapKV", item 4).

For each shape (Llama-2-7B: MHA 32 heads; Mistral-7B: GQA 32/8, sliding window 4096), random bf16
weights, batch 1, and each prompt length: `sk.prefill` with the full cache, SnapKV, StreamingLLM, H2O,
RandomKV, PyramidKV and Ada-KV (C = 1024, w = 32, chunk "auto"), median of `--reps` timed calls after a
compiling warm-up. Also timed: the prefill's own causal attention (`chunk_attention` over the same chunks,
every layer), since H2O's scoring is O(T^2) like attention and is judged against it.

Goals: every method within 5% of SnapKV's prefill; H2O's scoring (its prefill minus the full-cache
prefill) within 1.5x of the causal attention time.

    PYTHONPATH=$PWD python3 experiments/bench_methods.py --out $OUT
"""

from __future__ import annotations

import functools
import gc

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import snapkv_jax as sk
from experiments import bench_common as bc
from snapkv_jax.generate import plan_prefill
from snapkv_jax.models.chunked_attention import chunk_attention

METHODS = {
    "full": None,
    "snapkv": sk.SnapKV(capacity=1024),
    "streamingllm": sk.StreamingLLM(capacity=1024),
    "h2o": sk.H2O(capacity=1024),
    "random": sk.RandomKV(capacity=1024),
    "pyramidkv": sk.PyramidKV(capacity=1024),
    "adakv": sk.AdaKV(capacity=1024),
}


def attention_time(cfg, tokens: int, chunk: int, reps: int) -> float:
    """Seconds of the prefill's causal attention alone: every chunk against the layer's buffers (cuDNN,
    as prefill runs it), times the layer count."""
    kq, kk, kv_ = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(kq, (1, tokens, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    k = jax.random.normal(kk, (1, cfg.num_kv_heads, tokens, cfg.head_dim), jnp.bfloat16)
    v = jax.random.normal(kv_, (1, cfg.num_kv_heads, tokens, cfg.head_dim), jnp.bfloat16)
    attend = functools.partial(chunk_attention, sliding_window=cfg.sliding_window, implementation=bc.attention_implementation())

    @jax.jit
    def layer(q, k, v):
        def step(i, acc):
            qc = lax.dynamic_slice_in_dim(q, i * chunk, chunk, axis=1)
            return acc + attend(qc, k, v, i * chunk).astype(jnp.float32).sum()
        first = attend(q[:, :chunk], k, v, 0).astype(jnp.float32).sum()
        return lax.fori_loop(1, tokens // chunk, step, first) if tokens > chunk else first

    return cfg.num_layers * bc.timed(lambda: layer(q, k, v), reps=reps)


def run_shape(name, cfg, lengths, reps):
    rows = []
    cfg = bc.with_positions(cfg, max(lengths))
    params = bc.random_params(cfg)
    for tokens in lengths:
        prompt = np.random.default_rng(tokens).integers(0, cfg.vocab_size, (1, tokens), dtype=np.int32)
        plan = plan_prefill(params, cfg, prompt, None, "auto", 0, None)
        row = dict(shape=name, tokens=tokens, chunk=plan.chunk,
                   attention_s=attention_time(cfg, tokens, plan.chunk, reps))
        for label, method in METHODS.items():
            row[f"{label}_s"] = bc.timed(lambda: sk.prefill(params, cfg, prompt, compress=method), reps=reps)
            print(name, tokens, label, f"{row[f'{label}_s'] * 1e3:.1f} ms", flush=True)
        rows.append(row)
        gc.collect()
    del params
    gc.collect()
    return rows


def table(result) -> str:
    lines = [f"Prefill per compression method (C=1024, w=32), {result['device']}, jax {result['jax']}, "
             f"{result['date']}, batch 1, random bf16 weights", "",
             "| shape | T | chunk | full ms | " + " | ".join(f"{m} ms (x SnapKV)" for m in METHODS if m != "full")
             + " | causal attention ms | H2O scoring / attention |",
             "|---|---|---|---|" + "---|" * (len(METHODS) - 1) + "---|---|"]
    for r in result["rows"]:
        snap = r["snapkv_s"]
        cells = [f"{r[f'{m}_s'] * 1e3:.1f} ({r[f'{m}_s'] / snap:.3f})" if m != "snapkv" else f"{snap * 1e3:.1f}"
                 for m in METHODS if m != "full"]
        h2o = (r["h2o_s"] - r["full_s"]) / r["attention_s"]
        lines.append(f"| {r['shape']} | {r['tokens'] // 1024}K | {r['chunk']} | {r['full_s'] * 1e3:.1f} | "
                     + " | ".join(cells) + f" | {r['attention_s'] * 1e3:.1f} | {h2o:.2f} |")
    lines += ["", f"Command: `{result['command']}`"]
    return "\n".join(lines)


def main(argv=None):
    p = bc.shapes_parser(__doc__, reps=3)
    args = p.parse_args(argv)
    result = dict(bc.stamp(), rows=[])
    for name in args.shapes:
        result["rows"] += run_shape(name, bc.shapes()[name], args.lengths, args.reps)
        bc.write(args.out, "methods_prefill", result)
    text = table(result)
    bc.write(args.out, "methods_prefill", result, text)
    print(text)


if __name__ == "__main__":
    main()
