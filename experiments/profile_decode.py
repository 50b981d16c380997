"""Profile: where a decode step's time goes beyond its read roofline (Llama-2-7B shape, bf16, batch 1),
and where `extend` and a shared-context decode step spend theirs (issue 18's goals).

For a SnapKV C=1024 cache and a full 16K cache, one process measures the read-stream bandwidth
(`jnp.sum` over 8 GiB of bf16), times the donated decode step as bench_decode.py does, and records a
`jax.profiler` trace of `--steps` steps. From the trace's GPU stream lines it reports, per step: the
time some kernel was running (the union of kernel intervals), the idle gaps between kernels, the number
of kernels, and the kernels grouped by name (count and time per step), heaviest first. Run it once per
XLA_FLAGS setting to compare launch modes (`--tag` names the output). `--shared` adds the same for a
decode step of Q rows over a shared 32K-token context (SnapKV C=1024 and full) and for one `extend` of a
64-token question onto it, with the host time of the call (until it returns, before the device is done).

    PYTHONPATH=$PWD python3 experiments/profile_decode.py --out $OUT
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from bench_decode import filled_cache, step_bytes, time_decode  # noqa: E402
from bench_shared_context import context_cache, read_bandwidth  # noqa: E402

import snapkv_jax as sk  # noqa: E402
from snapkv_jax.generate import _decode_donated, _extend, context_flash  # noqa: E402


def trace_stats(run, steps: int, top: int) -> dict:
    """Per-call kernel statistics of `run()` called `steps` times under a trace (run returns what to
    block on)."""
    def run_steps():
        for _ in range(steps):
            out = run()
        jax.block_until_ready(out)
    events, lines = bc.kernel_events(bc.trace(run_steps))
    span = (max(s + d for _, s, d in events) - min(s for _, s, _ in events)) if events else 0
    by_name = collections.defaultdict(lambda: [0, 0])
    for name, _, dur in events:
        by_name[name][0] += 1
        by_name[name][1] += dur
    heavy = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    busy = bc.busy_ns(events)
    return dict(kernels_per_step=len(events) / steps, kernel_busy_ms=busy / steps / 1e6,
                traced_span_ms=span / steps / 1e6, gap_ms=(span - busy) / steps / 1e6,
                stream_lines=sorted(set(lines)),
                kernels=[dict(name=n[:120], count=c / steps, ms=t / steps / 1e6) for n, (c, t) in heavy[:top]])


def profile_shared(params, cfg, args) -> list[dict]:
    """Decode steps of Q rows over a shared context and one extend of a question onto it, for a full and
    a SnapKV context of `args.context` tokens: wall ms, host ms of the call, and the trace statistics."""
    rows = []
    for mode, held in (("full", args.context), ("snapkv", args.capacity)):
        ctx = context_cache(cfg, held, args.context)
        flash = context_flash(params, cfg, ctx)
        q = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 64)).astype(np.int32)
        ext = functools.partial(_extend, params, cfg, None, q, None, compress=None, max_slots=None, chunk="auto",
                                context=ctx, mesh=None, reserve=0, what="the question")
        jax.block_until_ready(ext()), jax.block_until_ready(ext())
        start = time.perf_counter()
        out = ext()
        host = time.perf_counter() - start
        jax.block_until_ready(out)
        wall = time.perf_counter() - start
        rows.append(dict(case="extend", context=mode, questions=1, host_ms=host * 1e3, wall_ms=wall * 1e3)
                    | trace_stats(ext, 2, args.top))
        print({k: v for k, v in rows[-1].items() if k != "kernels"}, flush=True)
        for n in args.questions:
            qs = np.random.default_rng(n).integers(0, cfg.vocab_size, (n, 64)).astype(np.int32)
            _, own = _extend(params, cfg, None, qs, None, compress=None, max_slots=None, chunk="auto", context=ctx,
                             mesh=None, reserve=args.steps * (args.reps + 3), what="the questions")
            token = jnp.full((n,), 7, jnp.int32)
            state = {"cache": own}

            def step():
                logits, state["cache"] = _decode_donated(params, token, state["cache"], ctx, cfg=cfg,
                                                         flash_context=flash)
                return logits
            for _ in range(args.steps):
                jax.block_until_ready(step())
            start = time.perf_counter()
            for _ in range(args.steps):
                out = step()
            jax.block_until_ready(out)
            wall = (time.perf_counter() - start) / args.steps
            rows.append(dict(case="decode", context=mode, questions=n, flash=flash, wall_ms=wall * 1e3)
                        | trace_stats(step, args.steps, args.top))
            print({k: v for k, v in rows[-1].items() if k != "kernels"}, flush=True)
            del own, state
        del ctx
    return rows


def profile(params, cfg, held: int, next_pos: int, args) -> dict:
    """bench_decode's step time, then a trace of `args.steps` steps on a fresh cache of the same shape
    (so the compiled step is reused)."""
    step_s = time_decode(cfg, params, held, next_pos, args)
    state = {"cache": filled_cache(cfg, held, held + args.steps * (args.reps + 1), next_pos, seed=held)}
    token = jnp.array([7], jnp.int32)

    def step():
        logits, state["cache"] = _decode_donated(params, token, state["cache"], cfg=cfg)
        return logits
    return dict(held_slots=held, step_ms=step_s * 1e3) | trace_stats(step, args.steps, args.top)


def kernel_table(title: str, kernels: list[dict]) -> list[str]:
    return ["", title, "", "| kernel | count | ms |", "|---|---|---|"] + \
        [f"| `{k['name']}` | {k['count']:.0f} | {k['ms']:.3f} |" for k in kernels]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--tag", default="default", help="names the output: profile_decode_TAG.{json,md}")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--capacity", type=int, default=1024)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--shared", action="store_true", help="also profile extend and decode over a shared context")
    p.add_argument("--context", type=int, default=32768, help="--shared: context tokens")
    p.add_argument("--questions", type=int, nargs="+", default=[1, 64], help="--shared: rows")
    p.add_argument("--quick", action="store_true", help="2 layers, 1K tokens (runs on the CPU; no GPU lines)")
    p.add_argument("--fused", action="store_true", help="params in sk.fuse_projections' layout")
    args = p.parse_args(argv)
    cfg = bc.with_positions(sk.ModelConfig.llama2_7b(), max(args.length, args.context) + 1024)
    if args.quick:
        cfg = dataclasses.replace(cfg, num_layers=2)
        args.capacity, args.length, args.steps, args.reps, args.context = 256, 1024, 2, 2, 1024
    params = bc.random_params(cfg, fused=args.fused)
    bandwidth = read_bandwidth(1 << (24 if args.quick else 32))
    rows = []
    for mode, held in (("snapkv", args.capacity), ("full", args.length)):
        row = dict(mode=mode) | profile(params, cfg, held, args.length, args)
        row["read_roofline_ms"] = step_bytes(cfg, params, held) / bandwidth * 1e3
        row["of_read_roofline"] = row["step_ms"] / row["read_roofline_ms"]
        rows.append(row)
        print({k: v for k, v in row.items() if k != "kernels"}, flush=True)
    shared = profile_shared(params, cfg, args) if args.shared else []
    model = bc.llama2_label(fused=args.fused)
    result = bc.stamp() | dict(model=model, dtype="bfloat16", batch=1, tag=args.tag,
                               xla_flags=os.environ.get("XLA_FLAGS", ""), read_bandwidth_Bps=bandwidth, rows=rows,
                               shared=shared)
    lines = [f"Decode step profile ({args.tag}; XLA_FLAGS={result['xla_flags'] or 'none'}), {model}, bf16, "
             f"batch 1; {result['device']}, jax {result['jax']}, {result['date']}; read stream "
             f"{bandwidth / 1e12:.2f} TB/s", "",
             "| cache | step ms | read roofline ms | x roofline | kernels/step | kernel busy ms | gaps ms |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} {r['held_slots']} | {r['step_ms']:.3f} | {r['read_roofline_ms']:.3f} | "
              f"{r['of_read_roofline']:.2f} | {r['kernels_per_step']:.0f} | {r['kernel_busy_ms']:.3f} | "
              f"{r['gap_ms']:.3f} |" for r in rows]
    for r in rows:
        lines += kernel_table(f"{r['mode']}: heaviest kernels per step", r["kernels"])
    if shared:
        lines += ["", f"Shared {args.context}-token context (question of 64 tokens)", "",
                  "| case | context | Q | wall ms | host ms | kernels/call | kernel busy ms | gaps ms |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['context']} | {r['questions']} | {r['wall_ms']:.3f} | "
                  f"{r.get('host_ms', float('nan')):.3f} | {r['kernels_per_step']:.0f} | {r['kernel_busy_ms']:.3f} | "
                  f"{r['gap_ms']:.3f} |" for r in shared]
        for r in shared:
            lines += kernel_table(f"{r['case']} {r['context']} Q={r['questions']}: heaviest kernels per call",
                                  r["kernels"])
    table = "\n".join(lines)
    bc.write(args.out, f"profile_decode_{args.tag}", result, table)
    print(table)


if __name__ == "__main__":
    main()
