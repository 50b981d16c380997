"""Benchmark: the floor XLA's matmuls put under a decode step. The Llama-2-7B shape's weight matmuls
alone (seven per layer and the LM head, no norms, RoPE, cache or attention), chained layer to layer as a
step chains them, for M rows (1: a batch-1 decode step; 64: the step of 64 questions on one shared
context), timed against the read roofline of the same weights measured in the same run (`jnp.sum` over
`--stream-gib` GiB, as bench_decode.py measures it).

Variants: `separate`, the model's layout (q, k, v, o, gate, up, down: seven matrices per layer);
`fused`, Q/K/V and gate/up each concatenated into one matrix (five per layer: `sk.fuse_projections`'
layout); `one matrix`, every weight byte in a single
[4096, N] matrix (one matmul: XLA's best over the same bytes without a kernel boundary). If `separate`
alone is past a goal's ratio, no change outside the matmuls reaches that goal. The process's XLA_FLAGS
are recorded and name the output (`--tag`): run it once per setting.

    PYTHONPATH=$PWD python3 experiments/bench_matmul_floor.py --out $OUT
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false PYTHONPATH=$PWD python3 experiments/bench_matmul_floor.py --tag no_triton_gemm --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from bench_snapkv_kernel import stream_ceilings, timed  # noqa: E402

from snapkv_jax.config import ModelConfig  # noqa: E402


def projections(params: dict) -> dict:
    """The weight matrices a step multiplies by: every layer's projections and the LM head (no embedding
    table, no norm scales), in the model's pytree (`bc.random_params`, separate or fused)."""
    layers = {n: {part: params[n][part] for part in ("attn", "mlp")} for n in params if n.startswith("layers_")}
    return layers | {"lm_head": params["lm_head"]}


def chained_matmuls(weights: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """x `[M, Dm]` through every layer's projections (attention replaced by q + k + v, which needs
    kv width == Dm: the MHA shape) -> logits `[M, V]`."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    for i in range(cfg.num_layers):
        attn, mlp = (weights[f"layers_{i}"][part] for part in ("attn", "mlp"))
        if "qkv_proj" in attn:
            q, k, v = jnp.split(x @ attn["qkv_proj"]["kernel"], [d, 2 * d], axis=-1)
        else:
            q, k, v = (x @ attn[p]["kernel"] for p in ("q_proj", "k_proj", "v_proj"))
        x = x + (q + k + v) @ attn["o_proj"]["kernel"]
        if "gate_up_proj" in mlp:
            gate, up = jnp.split(x @ mlp["gate_up_proj"]["kernel"], [f], axis=-1)
        else:
            gate, up = x @ mlp["gate_proj"]["kernel"], x @ mlp["up_proj"]["kernel"]
        x = x + (jax.nn.silu(gate) * up) @ mlp["down_proj"]["kernel"]
    return (x @ weights["lm_head"]["kernel"]).astype(jnp.float32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--tag", default="default", help="names the output files (say which XLA_FLAGS)")
    p.add_argument("--quick", action="store_true", help="2 layers, small streams (runs on CPU)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--inner", type=int, default=5, help="calls per timed repetition (the stream ceilings hold this many outputs)")
    p.add_argument("--stream-gib", type=float, default=8.0)
    args = p.parse_args(argv)
    cfg = ModelConfig.llama2_7b()
    if args.quick:
        cfg = dataclasses.replace(cfg, num_layers=2)
        args.reps, args.inner = 3, 2
    if cfg.num_kv_heads * cfg.head_dim != cfg.hidden_size:
        raise SystemExit("the chained matmuls stand attention in by q + k + v: an MHA shape is needed")
    read_bw, copy_bw = stream_ceilings(args)
    rows = []
    for variant in ("separate", "fused", "one matrix"):
        if variant == "one matrix":
            shapes = jax.eval_shape(lambda: projections(bc.random_params(cfg)))
            n = sum(w.size for w in jax.tree_util.tree_leaves(shapes)) // cfg.hidden_size
            weights = jax.random.normal(jax.random.key(1), (cfg.hidden_size, n), jnp.bfloat16)
            fn = jax.jit(lambda w, x: (x @ w).astype(jnp.float32))
        else:
            weights = projections(bc.random_params(cfg, fused=variant == "fused"))
            fn = jax.jit(lambda w, x: chained_matmuls(w, x, cfg))
        nbytes = sum(w.nbytes for w in jax.tree_util.tree_leaves(weights))
        for m in args.rows:
            x = jax.random.normal(jax.random.key(m), (m, cfg.hidden_size), jnp.bfloat16)
            seconds = timed(fn, [(weights, x)], args.reps, args.inner)
            device = bc.device_times(fn, [(weights, x)], calls=8) if jax.default_backend() == "gpu" else {}
            floor = nbytes / read_bw
            rows.append(dict(variant=variant, rows=m, weight_bytes=nbytes, ms=seconds * 1e3,
                             device_ms=device.get("busy_s", float("nan")) * 1e3,
                             kernels=device.get("kernels", float("nan")), read_roofline_ms=floor * 1e3,
                             of_read_roofline=seconds / floor,
                             device_of_read_roofline=device.get("busy_s", float("nan")) / floor))
            print(rows[-1], flush=True)
        del weights
    result = dict(bc.stamp(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                  model=bc.llama2_label(args.quick), dtype="bfloat16",
                  stream_gib=args.stream_gib, read_bandwidth_Bps=read_bw, copy_bandwidth_Bps=copy_bw, rows=rows)
    lines = [f"Decode-step matmuls alone ({args.tag}; XLA_FLAGS={result['xla_flags'] or 'none'}), "
             f"{result['model']}, bf16; {result['device']}, jax {result['jax']}, {result['date']}",
             f"read stream {read_bw / 1e12:.2f} TB/s, copy {copy_bw / 1e12:.2f} TB/s (read + write counted), "
             f"both in this run", "",
             "| variant | rows | weight GB | ms per call | device ms | kernels | read roofline ms "
             "| x read roofline | device x read roofline |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['rows']} | {r['weight_bytes'] / 1e9:.2f} | {r['ms']:.3f} | "
              f"{r['device_ms']:.3f} | {r['kernels']:.0f} | {r['read_roofline_ms']:.3f} | "
              f"{r['of_read_roofline']:.2f} | {r['device_of_read_roofline']:.2f} |" for r in rows]
    bc.write(args.out, f"matmul_floor_{args.tag}" + ("_quick" if args.quick else ""), result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
