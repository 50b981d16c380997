"""Benchmark: long context at scale on one GPU (issue "Long context at scale"), random bf16 weights.

Subcommands, each writing JSON + markdown (command, device, date) under `--out`:

  reach     SnapKV (C = 4096) prefill of a T-token prompt for a shape, then a short greedy decode from
            that cache. Time against the bound: matmul FLOPs / measured bf16 matmul rate + causal
            attention FLOPs / measured cuDNN attention rate, both measured in the same process. Before
            the prefill, the Pallas scoring kernel is checked against the `jnp` scores at this T (its
            K buffer may exceed 2^31 elements); if they disagree the run uses the `jnp` scoring and says
            so. A prefill longer than one device call can take runs in parts: `--layers 0:16 --state DIR`
            saves the hidden states and the finished layers' caches, `--layers 16:32 --state DIR` resumes.
  memory    peak device memory of `generate` (16 new tokens) for each case, each in a fresh process
            (the peak counter never resets), against the weights' bytes.
  compile   first-call times of `generate` (1, then 129 new tokens), full cache vs SnapKV, in fresh
            processes with the persistent compilation cache off; then two processes sharing a fresh
            cache directory: the second one's first call.

    PYTHONPATH=$PWD python3 experiments/bench_long_context.py reach --shape llama3-8b --tokens 131072 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import snapkv_jax as sk
from experiments import bench_common as bc
from snapkv_jax import cache as kv
from snapkv_jax import layer_prefill
from snapkv_jax.generate import plan_prefill

REACH_CAPACITY = 1024 * 4


# ------------------------------------------------------------------------------------------------ reach
def kernel_agrees(cfg, tokens: int) -> dict:
    """Pallas vs `jnp` SnapKV selection on random keys of this length (one layer's shapes)."""
    from snapkv_jax.snapkv import select
    kq, kk = jax.random.split(jax.random.key(11))
    q = jax.random.normal(kq, (1, cfg.num_heads, 32, cfg.head_dim), jnp.bfloat16)
    k = jax.random.normal(kk, (1, cfg.num_kv_heads, tokens, cfg.head_dim), jnp.bfloat16)
    lengths = jnp.array([tokens], jnp.int32)
    snap = sk.SnapKV(capacity=REACH_CAPACITY)
    a = np.asarray(select(q, k, lengths, snap, impl="pallas"))
    b = np.asarray(select(q, k, lengths, snap, impl="xla"))
    overlap = np.mean([len(np.intersect1d(a[0, h], b[0, h])) / a.shape[2] for h in range(a.shape[1])])
    del k
    return dict(kernel_overlap_with_jnp=float(overlap), kernel_ok=bool(overlap > 0.99))


def reach(args) -> dict:
    cfg = bc.with_positions(bc.shapes()[args.shape], args.tokens + 64)
    state = args.state
    first, stop = (int(x) for x in args.layers.split(":")) if args.layers else (0, cfg.num_layers)
    row = dict(shape=args.shape, tokens=args.tokens, capacity=REACH_CAPACITY, layers=[first, stop])
    row["matmul_flops"], row["attention_flops"] = bc.matmul_rate(), bc.attention_rate()
    check = kernel_agrees(cfg, args.tokens) if first == 0 else json.load(open(os.path.join(state, "row.json")))
    row.update({k: check[k] for k in ("kernel_overlap_with_jnp", "kernel_ok")})
    snap_impl = "pallas" if row["kernel_ok"] else "xla"
    params = bc.random_params(cfg)
    prompt = np.random.default_rng(args.tokens).integers(0, cfg.vocab_size, (1, args.tokens), dtype=np.int32)
    lengths = np.array([args.tokens], np.int32)
    compress = sk.SnapKV(capacity=REACH_CAPACITY)
    new_tokens = 8
    slots = REACH_CAPACITY + 16
    plan = plan_prefill(params, cfg, prompt, compress, "auto", slots - REACH_CAPACITY, None)
    row["chunk"] = plan.chunk
    row["estimated_peak_bytes"] = layer_prefill.estimate_peak(cfg, plan, 1, 2, compress, "cudnn") \
        + sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    t0 = time.perf_counter()
    progs = layer_prefill.programs(params, cfg, prompt, lengths, plan=plan, compress=compress, impl=snap_impl,
                                   attention=None, ahead_of_time=True)
    row["compile_s"] = time.perf_counter() - t0
    jl = jnp.asarray(lengths)
    outer = layer_prefill.outer_params(params)
    if first == 0:
        x = progs.embed(outer, jnp.asarray(prompt), jl)
        ks, vs, ps, elapsed = [], [], [], 0.0
    else:
        saved = np.load(os.path.join(state, "x.npy"))
        x = jnp.asarray(saved.view(jnp.bfloat16))
        del saved
        caches = np.load(os.path.join(state, "caches.npz"))
        n = first
        ks = [jnp.asarray(caches[f"k{i}"].view(jnp.bfloat16)) for i in range(n)]
        vs = [jnp.asarray(caches[f"v{i}"].view(jnp.bfloat16)) for i in range(n)]
        ps = [jnp.asarray(caches[f"p{i}"]) for i in range(n)]
        elapsed = check["prefill_s_so_far"]
    jax.block_until_ready(x)
    t0 = time.perf_counter()
    for layer in range(first, stop):
        x, k, v, pos = progs.layer(params[f"layers_{layer}"], x, jl, jnp.int32(layer))
        ks.append(k), vs.append(v), ps.append(pos)
        x.block_until_ready()
        print(f"layer {layer} done at {time.perf_counter() - t0:.1f} s", flush=True)
    elapsed += time.perf_counter() - t0
    row["peak_bytes"] = bc.peak_bytes()
    if stop < cfg.num_layers:
        os.makedirs(state, exist_ok=True)
        np.save(os.path.join(state, "x.npy"), np.asarray(x).view(np.uint16))
        np.savez(os.path.join(state, "caches.npz"),
                 **{f"k{i}": np.asarray(a).view(np.uint16) for i, a in enumerate(ks)},
                 **{f"v{i}": np.asarray(a).view(np.uint16) for i, a in enumerate(vs)},
                 **{f"p{i}": np.asarray(a) for i, a in enumerate(ps)})
        row["prefill_s_so_far"] = elapsed
        with open(os.path.join(state, "row.json"), "w") as f:
            json.dump(row, f)
        return row
    t1 = time.perf_counter()
    logits = jax.block_until_ready(progs.head(outer, x, jl))
    elapsed += time.perf_counter() - t1
    row["prefill_s"] = elapsed
    row["bound_s"] = bc.prefill_bound_s(cfg, args.tokens, row["matmul_flops"], row["attention_flops"])
    row["of_bound"] = row["bound_s"] / elapsed
    cache = kv.KVCache(k=tuple(ks), v=tuple(vs), pos=tuple(ps), end=jnp.minimum(jl, plan.program_width),
                       next_pos=jl, lengths=jnp.copy(jl), prompt_slots=plan.widths)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    generated = [int(token[0])]
    times = []
    for _ in range(new_tokens - 1):
        t1 = time.perf_counter()
        logits, cache = sk.decode_step(params, cfg, token, cache)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        generated.append(int(token[0]))
        times.append(time.perf_counter() - t1)
    row["decoded_tokens"] = generated
    row["decode_ms_per_token_after_first"] = 1e3 * float(np.median(times[1:])) if len(times) > 1 else None
    row["logits_finite"] = bool(np.isfinite(np.asarray(logits)).all())
    row["peak_bytes"] = bc.peak_bytes()
    return row


# ----------------------------------------------------------------------------------------------- memory
def memory_case(args) -> dict:
    cfg = bc.with_positions(bc.shapes()[args.shape], args.tokens + 64)
    params = bc.random_params(cfg)
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    jax.block_until_ready(params)
    after_weights = bc.peak_bytes()
    compress = None if args.method == "full" else sk.SnapKV(capacity=args.capacity)
    prompt = np.random.default_rng(args.tokens).integers(0, cfg.vocab_size, (1, args.tokens), dtype=np.int32)
    out = sk.generate(params, cfg, prompt, max_new_tokens=16, compress=compress)
    jax.block_until_ready(out.tokens)
    peak = bc.peak_bytes()
    plan = plan_prefill(params, cfg, prompt, compress, "auto", 32, None)
    return dict(shape=args.shape, tokens=args.tokens, method=args.method, capacity=args.capacity,
                weights_bytes=weights, peak_after_weights=after_weights, peak_bytes=peak,
                over_weights_gib=(peak - weights) / bc.GIB, chunk=plan.chunk,
                estimate_gib=layer_prefill.estimate_peak(cfg, plan, 1, 2, compress, "cudnn") / bc.GIB)


def memory(args) -> list[dict]:
    rows = []
    for tokens in args.lengths:
        for method in ("snapkv", "full"):
            rows.append(_fresh("memory-case", "--shape", args.shape, "--tokens", str(tokens), "--method", method,
                               "--capacity", str(args.capacity)))
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- compile
def compile_case(args) -> dict:
    if args.cache_dir:
        sk.enable_compilation_cache(args.cache_dir)
    cfg = bc.with_positions(bc.shapes()[args.shape], args.tokens + 256)
    params = bc.random_params(cfg)
    jax.block_until_ready(params)
    compress = None if args.method == "full" else sk.SnapKV(capacity=1024)
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, args.tokens), dtype=np.int32)
    row = dict(shape=args.shape, tokens=args.tokens, method=args.method, cache=bool(args.cache_dir))
    for n in (1, 129):
        t0 = time.perf_counter()
        jax.block_until_ready(sk.generate(params, cfg, prompt, max_new_tokens=n, compress=compress).tokens)
        row[f"first_call_{n}_s"] = time.perf_counter() - t0
        row[f"steady_{n}_s"] = bc.timed(
            lambda: sk.generate(params, cfg, prompt, max_new_tokens=n, compress=compress).tokens, reps=2, warmup=0)
        row[f"compile_{n}_s"] = row[f"first_call_{n}_s"] - row[f"steady_{n}_s"]
    return row


def compile_all(args) -> list[dict]:
    env = dict(os.environ, SNAPKV_JAX_COMPILATION_CACHE="off")
    base = ["--shape", args.shape, "--tokens", str(args.tokens)]
    rows = [_fresh("compile-case", *base, "--method", m, env=env) for m in ("full", "snapkv")]
    with tempfile.TemporaryDirectory() as cache_dir:
        for attempt in ("fills the cache", "reads the cache"):
            row = _fresh("compile-case", *base, "--method", "snapkv", "--cache-dir", cache_dir)
            row["process"] = attempt
            rows.append(row)
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------- glue
def _fresh(*argv, env=None) -> dict:
    """Runs a case in a new Python process; its last stdout line is the JSON row."""
    done = subprocess.run([sys.executable, "-m", "experiments.bench_long_context", *argv], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        return dict(argv=list(argv), error=done.stderr[-1500:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(kind: str, result: dict) -> str:
    head = f"{kind}: {result['device']}, jax {result['jax']}, {result['date']}; command `{result['command']}`"
    rows = result["rows"]
    if kind == "reach":
        lines = [head, "", "| shape | T | chunk | prefill s | bound s | of bound | peak GiB | kernel check | "
                 "decoded (greedy) | decode ms/token |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "prefill_s" not in r:
                lines.append(f"| {r['shape']} | {r['tokens']} | {r.get('chunk')} | (layers {r['layers']} done, "
                             f"{r.get('prefill_s_so_far', 0):.1f} s) | | | | | | |")
                continue
            lines.append(f"| {r['shape']} | {r['tokens']} | {r['chunk']} | {r['prefill_s']:.1f} | "
                         f"{r['bound_s']:.1f} | {r['of_bound']:.0%} | {r['peak_bytes'] / bc.GIB:.1f} | "
                         f"{'pallas' if r['kernel_ok'] else 'jnp (kernel disagreed)'} "
                         f"({r['kernel_overlap_with_jnp']:.3f}) | {r['decoded_tokens']} | "
                         f"{r['decode_ms_per_token_after_first']:.2f} |")
    elif kind == "memory":
        lines = [head, "", "| shape | T | method | weights GiB | peak GiB | peak - weights GiB | estimate GiB |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {' '.join(r['argv'])} | failed: {r['error'][-200:]!r} |")
                continue
            lines.append(f"| {r['shape']} | {r['tokens']} | {r['method']} | {r['weights_bytes'] / bc.GIB:.2f} | "
                         f"{r['peak_bytes'] / bc.GIB:.2f} | {r['over_weights_gib']:.2f} | {r['estimate_gib']:.2f} |")
    else:
        lines = [head, "", "| shape | T | method | persistent cache | first call, 1 token s | compile s | "
                 "first call, 129 tokens s | compile s |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {' '.join(r['argv'])} | failed: {r['error'][-200:]!r} |")
                continue
            lines.append(f"| {r['shape']} | {r['tokens']} | {r['method']} | {r.get('process', 'off')} | "
                         f"{r['first_call_1_s']:.2f} | {r['compile_1_s']:.2f} | {r['first_call_129_s']:.2f} | "
                         f"{r['compile_129_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=("reach", "memory", "compile", "memory-case", "compile-case"))
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--method", default="snapkv", choices=("snapkv", "full"))
    p.add_argument("--capacity", type=int, default=1024)
    p.add_argument("--layers", help="reach: first:stop layers to run in this process")
    p.add_argument("--state", help="reach: directory holding a partial prefill between processes")
    p.add_argument("--cache-dir", help="compile-case: persistent compilation cache directory")
    p.add_argument("--out", default="experiments/results")
    args = p.parse_args(argv)
    if args.kind.endswith("-case"):
        print(json.dumps(memory_case(args) if args.kind == "memory-case" else compile_case(args)))
        return
    rows = {"reach": lambda: [reach(args)], "memory": lambda: memory(args), "compile": lambda: compile_all(args)}
    result = dict(bc.stamp(), rows=rows[args.kind]())
    name = f"long_context_{args.kind}" + (f"_{args.shape}_{args.tokens}" if args.kind == "reach" else "")
    text = table(args.kind, result)
    bc.write(args.out, name, result, text)
    print(text)


if __name__ == "__main__":
    main()
