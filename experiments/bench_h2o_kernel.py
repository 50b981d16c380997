"""Benchmark: H2O's key scores by a Pallas kernel (`--backend`: h2o_scores_triton.py or h2o_scores_mosaic.py)
next to the prefill's own causal attention, per layer, in one run (issue "Compression methods beside
SnapKV", item 4: H2O's scoring within 1.5x of the causal attention time).

For each shape and prompt length, random bf16 q/k/v of one layer (batch 1) and the chunk size that
`chunk="auto"` picks, median of `--reps` timed calls of a jitted loop over every chunk of the layer:
  * attention: `chunk_attention` (cuDNN, as prefill runs it);
  * H2O scoring: the kernel given each query's log-sum-exp, which prefill takes from the attention for
    free; for sliding-window shapes (Mistral) the attention's log-sum-exp is the window's, so the scoring
    also pays `causal_lse` (one more cuDNN call per chunk), timed with it.
Also, on the first case: the kernel against the `jnp` reference on the last chunk (cuDNN's log-sum-exp, as
in prefill) and a small tiling sweep. `--prefill`: `sk.prefill` with H2O, SnapKV and the full cache on a
`--layers`-layer cut of the Llama-2-7B shape, H2O's extra time over the full cache against the attention.

    PYTHONPATH=$PWD python3 experiments/bench_h2o_kernel.py --out $OUT [--prefill] [--backend mosaic]
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import snapkv_jax as sk
from experiments import bench_common as bc
from snapkv_jax import memory
from snapkv_jax.layer_prefill import auto_chunk
from snapkv_jax.models.chunked_attention import causal_lse, chunk_attention
from snapkv_jax.pallas.h2o_scores import chunk_lse_reference, chunk_scores_reference
from snapkv_jax.pallas import h2o_scores_triton

IMPL = bc.attention_implementation()        # cuDNN on a GPU; the script also runs (slowly) on a CPU
INTERPRET = jax.default_backend() != "gpu"

TILINGS = {
    "triton": [dict(block_q=64, block_k=64, num_warps=4), dict(block_q=128, block_k=64, num_warps=4),
               dict(block_q=64, block_k=128, num_warps=4), dict(block_q=128, block_k=128, num_warps=8),
               dict(block_q=64, block_k=64, num_warps=4, num_stages=3)],
    "mosaic": [dict(block_q=64, block_k=64, stages=2), dict(block_q=128, block_k=64, stages=2),
               dict(block_q=64, block_k=128, stages=2), dict(block_q=64, block_k=64, stages=3)],
}


def kernel(backend: str):
    """The back-end's `h2o_chunk_scores` (the Mosaic module needs a jax with Pallas Mosaic GPU)."""
    if backend == "mosaic":
        from snapkv_jax.pallas import h2o_scores_mosaic
        return h2o_scores_mosaic.h2o_chunk_scores
    return h2o_scores_triton.h2o_chunk_scores


def layer_tensors(cfg, tokens: int):
    """q `[1, T, H, D]`, k, v `[1, K, T, D]`: one layer's prefill tensors, random bf16."""
    kq, kk, kv = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(kq, (1, tokens, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    k = jax.random.normal(kk, (1, cfg.num_kv_heads, tokens, cfg.head_dim), jnp.bfloat16)
    v = jax.random.normal(kv, (1, cfg.num_kv_heads, tokens, cfg.head_dim), jnp.bfloat16)
    return q, k, v


def over_chunks(fn, tokens: int, chunk: int):
    """A jitted loop `fn(i, acc) -> acc` over the layer's chunks, the first peeled (start a Python 0)."""
    def run(acc):
        acc = fn(0, acc)
        return lax.fori_loop(1, tokens // chunk, lambda i, a: fn(i, a), acc) if tokens > chunk else acc
    return jax.jit(run)


def attention_layer(cfg, q, k, v, chunk):
    attend = functools.partial(chunk_attention, sliding_window=cfg.sliding_window, implementation=IMPL,
                               with_lse=True)

    def step(i, acc):
        start = i * chunk
        out, lse = attend(lax.dynamic_slice_in_dim(q, start, chunk, axis=1), k, v, start)
        return acc + out.astype(jnp.float32).sum() + lse.sum()
    return over_chunks(step, q.shape[1], chunk)


def scoring_layer(cfg, q, k, lse_all, chunk, backend, tiling):
    """H2O's scores of every chunk: the kernel with `lse_all [1, H, T]` (what attention gave), or, for a
    sliding-window shape, with `causal_lse` computed per chunk (lse_all None)."""
    qh = q.transpose(0, 2, 1, 3)                                                 # [1, H, T, D]
    lengths = jnp.array([q.shape[1]], jnp.int32)

    def step(i, scores):
        start = i * chunk
        qc = lax.dynamic_slice_in_dim(qh, start, chunk, axis=2)
        if lse_all is None:
            lse = causal_lse(lax.dynamic_slice_in_dim(q, start, chunk, axis=1), k, start, implementation=IMPL)
        else:
            lse = lax.dynamic_slice_in_dim(lse_all, start, chunk, axis=2)
        return scores + kernel(backend)(qc, k, lse, lengths, start, interpret=INTERPRET, **tiling)
    zeros = jnp.zeros((1, cfg.num_heads, q.shape[1]), jnp.float32)
    return over_chunks(step, q.shape[1], chunk), zeros


def all_lse(q, k, chunk):
    """`[1, H, T]` causal log-sum-exp of every query, chunk by chunk (set-up, not timed)."""
    def step(i, out):
        start = i * chunk
        lse = causal_lse(lax.dynamic_slice_in_dim(q, start, chunk, axis=1), k, start, implementation=IMPL)
        return lax.dynamic_update_slice_in_dim(out, lse, start, axis=2)
    return over_chunks(step, q.shape[1], chunk)(jnp.zeros((1, q.shape[2], q.shape[1]), jnp.float32))


def check_last_chunk(q, k, lse_all, chunk, backend, tiling) -> float:
    """Max |kernel - reference| / max |reference| on the last chunk (cuDNN's log-sum-exp)."""
    t = q.shape[1]
    start = t - chunk

    @jax.jit
    def rel_err(q, k, lse_all):
        qc = q[:, start:].transpose(0, 2, 1, 3)
        lengths = jnp.array([t], jnp.int32)
        got = kernel(backend)(qc, k, lse_all[:, :, start:], lengths, start, interpret=INTERPRET, **tiling)
        ref = chunk_scores_reference(qc, k, lengths, start)
        return jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))
    return float(rel_err(q, k, lse_all))


def check_float32(backend: str) -> float:
    """The kernel on float32 inputs (IEEE dots) against the reference, small ragged GQA case."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 8, 100, 128)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 2, 300, 128)), jnp.float32)
    lengths, start = jnp.array([300, 170], jnp.int32), 150
    got = kernel(backend)(q, k, chunk_lse_reference(q, k, start), lengths, start, interpret=INTERPRET)
    ref = chunk_scores_reference(q, k, lengths, start)
    return float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))


def run_case(name, cfg, tokens, reps, sweep, check, backend):
    cfg = bc.with_positions(cfg, tokens)
    chunk = auto_chunk(cfg, tokens, 1, 2, None, 0, IMPL, memory.free_bytes()) or tokens
    q, k, v = layer_tensors(cfg, tokens)
    attention_s = bc.timed(functools.partial(attention_layer(cfg, q, k, v, chunk), jnp.float32(0)), reps=reps)
    windowed = cfg.sliding_window is not None and cfg.sliding_window < tokens
    lse_all = all_lse(q, k, chunk)
    row = dict(shape=name, tokens=tokens, chunk=chunk, attention_ms=attention_s * 1e3,
               lse_recomputed=windowed)
    tilings = TILINGS[backend] if sweep else TILINGS[backend][:1]
    row["tilings"] = []
    for tiling in tilings:
        fn, zeros = scoring_layer(cfg, q, k, None if windowed else lse_all, chunk, backend, tiling)
        ms = bc.timed(functools.partial(fn, zeros), reps=reps) * 1e3
        row["tilings"].append(dict(tiling=tiling, scoring_ms=ms))
        print(name, tokens, tiling, f"scoring {ms:.2f} ms, attention {attention_s * 1e3:.2f} ms", flush=True)
    best = min(row["tilings"], key=lambda r: r["scoring_ms"])
    row.update(scoring_ms=row["tilings"][0]["scoring_ms"], best_tiling=best["tiling"], best_ms=best["scoring_ms"])
    row["flops_rate"] = 2 * (tokens * tokens / 2) * cfg.num_heads * cfg.head_dim / (row["scoring_ms"] / 1e3)
    if check:
        row["max_rel_err_last_chunk"] = check_last_chunk(q, k, lse_all, chunk, backend, TILINGS[backend][0])
    return row


def prefill_rows(layers: int, tokens: int, reps: int, attention_ms_per_layer: float):
    cfg = dataclasses.replace(bc.with_positions(bc.shapes()["llama2-7b"], tokens), num_layers=layers)
    params = bc.random_params(cfg)
    prompt = np.random.default_rng(tokens).integers(0, cfg.vocab_size, (1, tokens), dtype=np.int32)
    row = dict(layers=layers, tokens=tokens)
    for label, method in (("full", None), ("snapkv", sk.SnapKV(capacity=1024)), ("h2o", sk.H2O(capacity=1024))):
        row[f"{label}_ms"] = bc.timed(lambda: sk.prefill(params, cfg, prompt, compress=method), reps=reps) * 1e3
        print("prefill", layers, "layers", tokens, label, f"{row[f'{label}_ms']:.1f} ms", flush=True)
    row["h2o_scoring_over_attention"] = (row["h2o_ms"] - row["full_ms"]) / (layers * attention_ms_per_layer)
    return row


def table(result) -> str:
    lines = [f"H2O key scores (Pallas {result.get('backend', 'triton')} kernel) vs the prefill's causal attention, "
             f"one layer, {result['device']}, jax {result['jax']}, {result['date']}, batch 1, bf16", "",
             "| shape | T | chunk | attention ms | H2O scoring ms | scoring / attention | scoring TFLOP/s (q.k) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        extra = " (+ causal_lse: windowed attention)" if r["lse_recomputed"] else ""
        lines.append(f"| {r['shape']} | {r['tokens'] // 1024}K | {r['chunk']} | {r['attention_ms']:.2f} | "
                     f"{r['scoring_ms']:.2f}{extra} | {r['scoring_ms'] / r['attention_ms']:.2f} | "
                     f"{r['flops_rate'] / 1e12:.0f} |")
    for r in result["rows"]:
        if len(r["tilings"]) > 1:
            lines += ["", f"Tiling sweep, {r['shape']} {r['tokens'] // 1024}K (first = default):", "",
                      "| tiling | scoring ms |", "|---|---|"]
            lines += [f"| {t['tiling']} | {t['scoring_ms']:.2f} |" for t in r["tilings"]]
    for r in result["rows"][:1]:
        lines += ["", f"Kernel vs `jnp` reference on the last chunk of {r['shape']} {r['tokens'] // 1024}K (cuDNN "
                  f"log-sum-exp): max rel. error {r['max_rel_err_last_chunk']:.1e}; float32 inputs: "
                  f"{result['float32_rel_err']:.1e}"]
    for p in result.get("prefill", []):
        lines += ["", f"`sk.prefill`, Llama-2-7B shape cut to {p['layers']} layers, {p['tokens'] // 1024}K tokens: "
                  f"full {p['full_ms']:.1f} ms, SnapKV {p['snapkv_ms']:.1f} ms, H2O {p['h2o_ms']:.1f} ms "
                  f"({p['h2o_ms'] / p['snapkv_ms']:.2f}x SnapKV); H2O's extra time over the full cache / "
                  f"attention = {p['h2o_scoring_over_attention']:.2f}"]
    lines += ["", f"Command: `{result['command']}`"]
    return "\n".join(lines)


def main(argv=None):
    p = bc.shapes_parser(__doc__, reps=5)
    p.add_argument("--prefill", action="store_true")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--backend", choices=tuple(TILINGS), default="triton",
                   help="the kernel timed (mosaic: Hopper and later); writes h2o_kernel_bench_BACKEND.{md,json}")
    p.add_argument("--no-sweep", action="store_true", help="time the default tiling only")
    args = p.parse_args(argv)
    name_out = f"h2o_kernel_bench_{args.backend}"
    result = dict(bc.stamp(), backend=args.backend, rows=[], float32_rel_err=check_float32(args.backend))
    for name in args.shapes:
        for tokens in args.lengths:
            sweep = not result["rows"] and not args.no_sweep
            result["rows"].append(run_case(name, bc.shapes()[name], tokens, args.reps, sweep,
                                           check=not result["rows"], backend=args.backend))
            bc.write(args.out, name_out, result, table(result))
    if args.prefill:
        per_layer = result["rows"][0]["attention_ms"]
        result["prefill"] = [prefill_rows(args.layers, args.lengths[0], args.reps, per_layer)]
        bc.write(args.out, name_out, result, table(result))
    print(table(result))


if __name__ == "__main__":
    main()
