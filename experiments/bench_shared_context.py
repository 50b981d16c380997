"""Benchmark: one context, many questions (Llama-2-7B shape, bf16, random weights). A 32K-token context
is held once (`context=`) and Q = 1, 8, 64 questions of 64 tokens attend to it, against the same context
copied into every row, for a SnapKV C=1024 context and for the full cache.

Figures, each a ratio measured in this run (METHOD.md):
  * decode step of Q rows (each with room for 64 new tokens, as generate allocates) vs its read roofline:
    (weights but the embedding table, + the context's K/V once, + the rows' own live slots) over the
    read-stream bandwidth (`jnp.sum` over a large bf16 array), and vs the Q=1 step and the copied rows'
    step; shared rows attend to the context by cuDNN flash attention (split-K) and by the `jnp` path.
    A step is timed as `generate` runs it, inside its jitted decode loop: the loop's time for n2 tokens
    minus its time for n1 tokens, over n2 - n1 (so the loop's fixed costs drop out, and no per-step host
    dispatch is counted that `generate` does not pay);
  * `extend` of one 64-token question onto the 32K context vs the roofline of reading the weights and
    the context's K/V once;
  * peak device memory of `generate(questions, context=ctx, max_new_tokens=64)` for Q=64 over the full
    context, in a fresh process (the device's peak counter never resets, and this process holds an 8 GiB
    read-stream buffer and other cells' caches), vs weights + one context cache + the rows' own slots.
The context cache is filled with random K/V directly (prefill is benchmarked elsewhere); copied rows that
cannot fit in device memory are reported as such, with the bytes they would need.

    PYTHONPATH=$PWD python3 experiments/bench_shared_context.py --out $OUT
    PYTHONPATH=$PWD python3 experiments/bench_shared_context.py --quick --out /tmp/sc   # CPU, 2 layers
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import os
import json
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

import snapkv_jax as sk  # noqa: E402
from snapkv_jax import cache as kv  # noqa: E402
from snapkv_jax import memory  # noqa: E402
from snapkv_jax.generate import _decode_loop_program, _extend, bucket_width, context_flash  # noqa: E402

GIB = 2**30


def read_bandwidth(elements: int) -> float:
    """Bytes/s of a read stream: `jnp.sum` over `elements` bf16 values (one read, a scalar written), the
    fastest of 10 calls."""
    x = jax.random.normal(jax.random.key(0), (elements,), jnp.bfloat16)
    f = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    seconds = bc.fastest(lambda: f(x))
    del x
    return elements * 2 / seconds


def context_cache(cfg, held: int, tokens: int, seed: int = 0) -> kv.KVCache:
    """A batch-1 cache of `held` random K/V slots for a `tokens`-long context (positions spread over it,
    the last `held // 32` of them the context's last positions, as a compressed cache has)."""
    tail = max(held // 32, 1)
    pos = np.concatenate([np.linspace(0, tokens - tail - 1, held - tail).astype(np.int32),
                          np.arange(tokens - tail, tokens, dtype=np.int32)]) if held < tokens else np.arange(tokens)
    pos = jnp.broadcast_to(jnp.asarray(pos, jnp.int32), (1, cfg.num_kv_heads, held))
    keys = jax.random.split(jax.random.key(seed), 2 * cfg.num_layers)
    shape = (1, cfg.num_kv_heads, held, cfg.head_dim)
    return kv.KVCache(k=tuple(jax.random.normal(keys[2 * i], shape, jnp.bfloat16) for i in range(cfg.num_layers)),
                      v=tuple(jax.random.normal(keys[2 * i + 1], shape, jnp.bfloat16) for i in range(cfg.num_layers)),
                      pos=tuple(jnp.copy(pos) for _ in range(cfg.num_layers)), end=jnp.full((1,), held, jnp.int32),
                      next_pos=jnp.full((1,), tokens, jnp.int32), lengths=jnp.full((1,), tokens, jnp.int32))


def weight_bytes(params) -> int:
    """Bytes a decode step reads of the weights: all but the embedding table (one row of it)."""
    embed = params["embed"]["embedding"]
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(params)) - embed.nbytes + embed.nbytes // embed.shape[0]


def live_kv_bytes(cache: kv.KVCache) -> int:
    return kv.held_bytes(cache)


def step_ms(params, cfg, cache, context, flash: bool, budget: int, n1: int, n2: int, reps: int) -> float:
    """Median ms of one decode step inside generate's jitted decode loop: (time of n2 tokens - time of n1
    tokens) / (n2 - n1), each run on a fresh copy of `cache` (the loop donates it), never stopping early."""
    program = _decode_loop_program()
    logits = jnp.zeros((cache.batch, cfg.vocab_size), jnp.float32)

    def loop_s(n: int) -> float:
        fresh = jax.block_until_ready(jax.tree_util.tree_map(jnp.copy, cache))
        start = time.perf_counter()
        out = program(params, logits, fresh, context, np.int32(n), np.uint32(0), np.float32(1e-6),
                      np.float32(1.0), np.int32(-1), cfg=cfg, budget=budget, greedy=True, top_k=0,
                      use_top_p=False, flash_context=flash)
        jax.block_until_ready(out.tokens)
        return time.perf_counter() - start

    loop_s(n1)  # compile, warm up
    short = statistics.median(loop_s(n1) for _ in range(reps))
    long = statistics.median(loop_s(n2) for _ in range(reps))
    return (long - short) / (n2 - n1) * 1e3


def run_case(params, cfg, ctx, mode: str, rows: int, shared: bool, flash: bool, args, bandwidth: float) -> dict:
    """One (context, Q, shared or copied, attention path) cell: the own caches built by extend with room
    for `new_tokens` (what generate allocates), then timed decode steps in that room."""
    q = np.random.default_rng(rows).integers(0, cfg.vocab_size, (rows, args.question)).astype(np.int32)
    row = dict(context=mode, questions=rows, shared=shared, context_slots=ctx.slots,
               context_attention="cudnn" if flash else "xla")
    lengths = np.full((rows,), args.question, np.int32)
    budget = bucket_width(args.new_tokens)
    extend = functools.partial(_extend, params, cfg, tokens=q, lengths=lengths, compress=None, max_slots=None,
                               chunk="auto", mesh=None, reserve=budget, what="the question")
    if shared:
        _, own = extend(cache=None, context=ctx)
        context = ctx
    else:
        need = rows * kv.allocated_bytes(ctx)
        free = memory.free_bytes()
        if free is not None and need > 0.6 * free:
            return row | dict(fits=False, copied_context_bytes=need, free_bytes=free)
        # widened once at batch 1 before the rows are copied, so extend finds room and copies nothing more
        room = kv.widen(ctx, bucket_width(args.question + budget))
        _, own = extend(cache=kv.take_rows(room, [0] * rows), context=None)
        del room
        context = None
    # live slots: the context's (once, or once per copied row) and each row's own, the question and the
    # new tokens written so far, counted at the middle of the timed steps
    ctx_live = live_kv_bytes(ctx)
    per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    own_live = per_slot * rows * (args.question + (args.n1 + args.n2) // 2)
    held = ctx_live + own_live if shared else rows * ctx_live + own_live
    ms = step_ms(params, cfg, own, context, flash, budget, args.n1, args.n2, args.reps)
    floor = (weight_bytes(params) + held) / bandwidth * 1e3
    row |= dict(fits=True,
                own_allocated_bytes=kv.allocated_bytes(own), context_allocated_bytes=kv.allocated_bytes(ctx),
                step_ms=ms, roofline_ms=floor, of_roofline=ms / floor, live_kv_bytes=held)
    del own
    gc.collect()
    return row


def time_extend(params, cfg, ctx, args, bandwidth: float) -> dict:
    """One 64-token question appended to the context (shared, Q=1): median ms vs reading weights + the
    context's K/V once."""
    q = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.question)).astype(np.int32)
    call = lambda: sk.extend(params, cfg, None, q, context=ctx)[0]
    ms = bc.timed(call, reps=args.reps, warmup=2) * 1e3
    hosts = []
    for _ in range(args.reps):
        start = time.perf_counter()
        out = call()
        hosts.append(time.perf_counter() - start)
        jax.block_until_ready(out)
    floor = (weight_bytes(params) + live_kv_bytes(ctx)) / bandwidth * 1e3
    return dict(extend_ms=ms, extend_host_ms=statistics.median(hosts) * 1e3, extend_roofline_ms=floor,
                extend_of_roofline=ms / floor)


def peak_case(args) -> dict:
    """In this (fresh) process: `generate` for Q questions over a full context of `args.context` tokens,
    then the device's peak bytes in use, with the budget they are judged against."""
    cfg = bc.with_positions(sk.ModelConfig.llama2_7b(), args.context + 4096)
    if args.quick:
        cfg = dataclasses.replace(cfg, num_layers=2)
    params = bc.random_params(cfg, fused=args.fused)
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    ctx = context_cache(cfg, args.context, args.context)
    rows = max(args.questions)
    q = np.random.default_rng(rows).integers(0, cfg.vocab_size, (rows, args.question)).astype(np.int32)
    out = sk.generate(params, cfg, q, context=ctx, max_new_tokens=args.new_tokens)
    jax.block_until_ready(out.tokens)
    own = kv.allocated_bytes(out.cache)
    context = kv.allocated_bytes(ctx)
    return dict(questions=rows, peak_bytes=bc.peak_bytes(), weight_bytes=weights, context_allocated_bytes=context,
                own_allocated_bytes=own, budget_bytes=weights + context + own + GIB)


def fresh_peak(args) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--peak-case", "--context", str(args.context),
            "--question", str(args.question), "--new-tokens", str(args.new_tokens), "--questions",
            *map(str, args.questions)] + (["--quick"] if args.quick else []) + (["--fused"] if args.fused else [])
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        return dict(error=done.stderr[-1500:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--quick", action="store_true", help="2 layers, a 2K context, Q = 1, 4 (runs on CPU)")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--capacity", type=int, default=1024)
    p.add_argument("--questions", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--question", type=int, default=64, help="tokens per question")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--n1", type=int, default=8, help="tokens of the shorter timed decode loop")
    p.add_argument("--n2", type=int, default=56, help="tokens of the longer timed decode loop")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--shared-paths", nargs="+", choices=("cudnn", "xla"), default=["cudnn", "xla"],
                   help="context attention paths timed for shared rows (cudnn where the context allows it)")
    p.add_argument("--extend-only", action="store_true",
                   help="time extend alone: no decode steps, no peak (writes shared_context_extend.{md,json})")
    p.add_argument("--shared-only", action="store_true",
                   help="time the shared rows' cells alone: no copied rows, no peak "
                        "(writes shared_context*_shared.{md,json})")
    p.add_argument("--fused", action="store_true",
                   help="params in sk.fuse_projections' layout (writes shared_context_fused*.{md,json})")
    p.add_argument("--peak-case", action="store_true", help=argparse.SUPPRESS)  # fresh_peak's child
    args = p.parse_args(argv)
    if args.quick:
        args.context, args.capacity, args.questions, args.n1, args.n2, args.reps = 2048, 256, [1, 4], 4, 12, 2
    if args.peak_case:
        print(json.dumps(peak_case(args)))
        return
    if not 1 <= args.n1 < args.n2 <= bucket_width(args.new_tokens):
        p.error(f"need 1 <= --n1 < --n2 <= the decode budget {bucket_width(args.new_tokens)}")
    cfg = bc.with_positions(sk.ModelConfig.llama2_7b(), args.context + 4096)
    read_elements = 1 << 32  # 8 GiB of bf16
    if args.quick:
        cfg = dataclasses.replace(cfg, num_layers=2)
        read_elements = 1 << 24
    # first, so this process's 8 GiB read buffer does not share the device with it
    skip_peak = "--extend-only" if args.extend_only else "--shared-only" if args.shared_only else None
    peak = dict(error=skip_peak) if skip_peak else fresh_peak(args)
    print(peak, flush=True)
    params = jax.block_until_ready(bc.random_params(cfg, fused=args.fused))
    read_bw, copy_bw = read_bandwidth(read_elements), bc.copy_bandwidth()
    rows, extends = [], {}
    for mode, held in (("full", args.context), ("snapkv", args.capacity)):
        ctx = context_cache(cfg, held, args.context)
        extends[mode] = time_extend(params, cfg, ctx, args, read_bw)
        print(mode, extends[mode], flush=True)
        if args.extend_only:
            continue
        paths = [(True, True)] if "cudnn" in args.shared_paths and context_flash(params, cfg, ctx) else []
        paths += [(True, False)] if "xla" in args.shared_paths else []
        for shared, flash in paths + ([] if args.shared_only else [(False, False)]):
            for q in args.questions:
                rows.append(run_case(params, cfg, ctx, mode, q, shared, flash, args, read_bw))
                print(rows[-1], flush=True)
        del ctx
        gc.collect()
    for r in rows:
        if not r.get("fits"):
            continue
        one = next((x for x in rows if x["context"] == r["context"] and x["shared"] and x["questions"] == 1
                    and x["context_attention"] == r["context_attention"]), None)
        r["vs_q1_shared"] = r["step_ms"] / one["step_ms"] if one else float("nan")
        copied = next((x for x in rows if x["context"] == r["context"] and not x["shared"]
                       and x["questions"] == r["questions"] and x.get("fits")), None)
        if copied is not None and r["shared"]:
            r["speedup_vs_copied"] = copied["step_ms"] / r["step_ms"]
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    result = bc.stamp() | dict(model=bc.llama2_label(args.quick, args.fused),
                               dtype="bfloat16", read_bandwidth_Bps=read_bw, copy_bandwidth_Bps=copy_bw,
                               weight_bytes=weights, context_tokens=args.context, question_tokens=args.question,
                               decode_timing=f"generate's decode loop, ({args.n2} - {args.n1} tokens) / "
                                             f"{args.n2 - args.n1}", rows=rows, extend=extends, peak=peak)
    lines = [f"Shared context, {result['model']}, bf16; {result['device']}, jax {result['jax']}, {result['date']}",
             f"read stream {read_bw / 1e12:.2f} TB/s, copy {copy_bw / 1e12:.2f} TB/s (same run); weights "
             f"{weights / GIB:.2f} GiB; context {args.context} tokens; questions of {args.question} tokens; "
             f"a step timed inside generate's decode loop ({result['decode_timing']})"]
    if rows:
        lines += ["", "| context | Q | held | context attention | step ms | read roofline ms | x roofline | x Q=1 step "
                  "| speed-up vs copied |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kind = "shared" if r["shared"] else "copied"
        if not r.get("fits"):
            lines.append(f"| {r['context']} | {r['questions']} | {kind} | | does not fit: "
                         f"{r['copied_context_bytes'] / GIB:.1f} GiB of copies | | | | |")
            continue
        lines.append(f"| {r['context']} | {r['questions']} | {kind} | {r['context_attention']} | {r['step_ms']:.3f} | "
                     f"{r['roofline_ms']:.3f} | {r['of_roofline']:.2f} | {r['vs_q1_shared']:.2f} | "
                     f"{r.get('speedup_vs_copied', float('nan')):.2f} |")
    lines += ["", "| context | extend of one question ms | host ms (until the call returns) | read roofline ms "
              "| x roofline |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {e['extend_ms']:.2f} | {e['extend_host_ms']:.2f} | {e['extend_roofline_ms']:.2f} | "
              f"{e['extend_of_roofline']:.2f} |" for m, e in extends.items()]
    if peak.get("peak_bytes"):
        lines.append(f"\nPeak memory of generate (Q={peak['questions']}, {args.new_tokens} new tokens each) over the "
                     f"full context, fresh process: {peak['peak_bytes'] / GIB:.2f} GiB vs weights "
                     f"{peak['weight_bytes'] / GIB:.2f} + context cache {peak['context_allocated_bytes'] / GIB:.2f} + "
                     f"the rows' own slots {peak['own_allocated_bytes'] / GIB:.2f} + 1 GiB = "
                     f"{peak['budget_bytes'] / GIB:.2f} GiB.")
    else:
        lines.append(f"\nPeak memory: not measured ({peak.get('error', 'no device memory statistics')[-300:]})")
    table = "\n".join(lines)
    name = ("shared_context" + ("_fused" if args.fused else "") + ("_extend" if args.extend_only else "")
            + ("_shared" if args.shared_only and not args.extend_only else "")
            + ("_quick" if args.quick else ""))
    bc.write(args.out, name, result, table)
    print(table)


if __name__ == "__main__":
    main()
