"""Probe: the device time of `extend`'s two heaviest kernel kinds for a 64-token question on a shared
32K-token context (Llama-2-7B shape, bf16), against the read stream measured in the same run.

1. The context pass by cuDNN (`slot_attention._flash_part`): 64 queries of 32 heads over 32K context
   slots, split into n key blocks per head (n = 1 .. 64; `_flash_splits` picked 16 for this shape until
   this probe's first run, 4 since), so
   the kernel's work items are 32 n; also the same for 64 rows of one query each (a Q=64 decode step)
   and for one row of one query (a Q=1 decode step).
2. The M=64 matmuls of one layer (fused Q/K/V 4096x12288, output 4096x4096, fused gate/up 4096x22016,
   down 11008x4096): XLA's dot as the model writes it, and split along the contraction into s parts
   (a batched dot into s float32 partial products, then their sum), s = 2, 4, 8.
3. `extend` of one 64-token question onto the context, one call at a time: when its first kernel starts
   after the call does, how long the device is busy and idle, when its last kernel ends.

Each figure of 1-2 is the device time per call (profiler trace, `bench_common.device_times`) and the
bytes the call must read over it, as a fraction of the read stream. Writes probe_extend_kernels.{json,md}
(probe_extend_timeline.{json,md} with --timeline-only).

    PYTHONPATH=$PWD python3 experiments/probe_extend_kernels.py --out $OUT
    PYTHONPATH=$PWD python3 experiments/probe_extend_kernels.py --timeline-only --out $OUT   # 3 alone
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from bench_shared_context import context_cache, read_bandwidth  # noqa: E402

import snapkv_jax as sk  # noqa: E402

from snapkv_jax.models.slot_attention import SlotPart, _flash_part, _flash_splits  # noqa: E402

HEADS, HEAD_DIM = 32, 128
MATMULS = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}


def flash_case(rows: int, per_row: int, slots: int, splits: int, calls: int) -> dict:
    """Device time of `_flash_part` for `rows` rows of `per_row` queries over `slots` occupied context slots
    cut into `splits` key blocks per head."""
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (rows, per_row, HEADS, HEAD_DIM), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (1, HEADS, slots, HEAD_DIM), jnp.bfloat16) for kk in ks[1:])
    pos = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (1, HEADS, slots))
    blocks = (jnp.full((HEADS * splits,), slots // splits, jnp.int32), jnp.ones((HEADS * splits,), bool))
    f = jax.jit(lambda q, k, v, pos, blocks: _flash_part(q, SlotPart(k, v, pos, shared=True, flash=True,
                                                                     blocks=blocks))[0])
    jax.block_until_ready(f(q, k, v, pos, blocks))                              # compile and autotune first
    t = bc.device_times(f, [(q, k, v, pos, blocks)], calls)
    return dict(rows=rows, per_row=per_row, splits=splits, device_us=t["busy_s"] * 1e6, kernels=t["kernels"],
                bytes=k.nbytes + v.nbytes)


def matmul_case(name: str, rows: int, split: int, calls: int) -> dict:
    """Device time of `[rows, K] @ [K, N]` (bf16, float32 accumulation), the contraction in `split` parts."""
    kdim, n = MATMULS[name]
    x = jax.random.normal(jax.random.key(1), (rows, kdim), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(2), (kdim, n), jnp.bfloat16) * 0.02
    if split == 1:
        f = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
    else:
        def f(x, w):
            parts = jnp.einsum("bsk,skn->sbn", x.reshape(rows, split, kdim // split),
                               w.reshape(split, kdim // split, n), preferred_element_type=jnp.float32)
            return jnp.sum(parts, axis=0).astype(x.dtype)
        f = jax.jit(f)
    jax.block_until_ready(f(x, w))                                              # compile and autotune first
    t = bc.device_times(f, [(x, w)], calls)
    return dict(name=name, rows=rows, split=split, device_us=t["busy_s"] * 1e6, kernels=t["kernels"],
                bytes=w.nbytes)


def timeline(fn, calls: int) -> dict:
    """Where the device's part of an isolated call of `fn()` lies, median over `calls` calls each waited
    for: from the call's start (a host annotation on the trace's clock; Python tracer off) to its first
    kernel (`start_ms`), the union of its kernels' intervals (`busy_ms`), the device idle between its
    first and last kernel (`idle_ms`), and its last kernel's end (`end_ms`)."""
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    options.host_tracer_level = 1
    jax.block_until_ready(fn())

    def calls_one_by_one():
        for _ in range(calls):
            with jax.profiler.TraceAnnotation("probe call"):
                out = fn()
            jax.block_until_ready(out)
    data = bc.trace(calls_one_by_one, options)
    kernels, _ = bc.kernel_events(data)
    starts = sorted(int(e.start_ns) for plane in data.planes if plane.name.startswith("/host")
                    for line in plane.lines for e in line.events if e.name == "probe call")
    rows = []
    for i, t0 in enumerate(starts):
        t1 = starts[i + 1] if i + 1 < len(starts) else float("inf")
        mine = [(n, s, d) for n, s, d in kernels if t0 <= s < t1]
        if not mine:
            continue
        first, last = min(s for _, s, _ in mine), max(s + d for _, s, d in mine)
        busy = bc.busy_ns(mine)
        rows.append(((first - t0) / 1e6, busy / 1e6, (last - first - busy) / 1e6, (last - t0) / 1e6))
    med = np.median(np.array(rows), axis=0) if rows else [float("nan")] * 4        # no GPU kernels: nan
    return dict(start_ms=med[0], busy_ms=med[1], idle_ms=med[2], end_ms=med[3], calls=len(rows))


def one_call_kernels(fn) -> list[str]:
    """The kernels of one call of `fn()` in the order the device ran them: name (cut), microseconds, and
    the idle microseconds before each."""
    jax.block_until_ready(fn())
    kernels, _ = bc.kernel_events(bc.trace(lambda: jax.block_until_ready(fn())))
    kernels.sort(key=lambda e: e[1])
    out, end = [], kernels[0][1] if kernels else 0
    for name, start, dur in kernels:
        out.append(f"{(start - end) / 1e3:8.1f} {dur / 1e3:8.1f}  {name[:90]}")
        end = max(end, start + dur)
    return out


def extend_timelines(calls: int) -> list[str]:
    """`timeline` of `extend` of one 64-token question onto a full and a SnapKV C=1024 32K-token context
    (Llama-2-7B shape, bf16, random weights, projections fused and not)."""
    cfg = bc.with_positions(sk.ModelConfig.llama2_7b(), 32768 + 4096)
    lines = ["", "extend of a 64-token question onto a 32K context, one call at a time (median of "
             f"{calls}): ms from the call's start", "",
             "| params | context | first kernel | device busy | device idle inside | last kernel ends |",
             "|---|---|---|---|---|---|"]
    q = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 64)).astype(np.int32)
    for fused in (False, True):
        params = jax.block_until_ready(bc.random_params(cfg, fused=fused))
        for mode, held in (("full", 32768), ("snapkv", 1024)):
            ctx = jax.block_until_ready(context_cache(cfg, held, 32768))
            t = timeline(lambda: sk.extend(params, cfg, None, q, context=ctx), calls)
            if fused and mode == "full":
                listing = one_call_kernels(lambda: sk.extend(params, cfg, None, q, context=ctx))
            lines.append(f"| {'fused' if fused else 'separate'} | {mode} | {t['start_ms']:.2f} | {t['busy_ms']:.2f} | "
                         f"{t['idle_ms']:.2f} | {t['end_ms']:.2f} |")
            del ctx
        del params
    return lines + ["", "The kernels of one such call (fused projections, full context), in order: idle us "
                    "before, us, name", "", "```", *listing, "```"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--slots", type=int, default=32768)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--timeline-only", action="store_true", help="only the extend timelines")
    args = parser.parse_args()
    read_bw = read_bandwidth(4 << 30)
    result = dict(bc.stamp(), xla_flags=os.environ.get("XLA_FLAGS", ""), read_bw=read_bw, flash=[], matmuls=[])
    lines = [f"# extend's heavy kernels: {result['device']}, jax {result['jax']}, {result['date']}; read stream "
             f"{read_bw / 1e12:.2f} TB/s; XLA_FLAGS={result['xla_flags'] or 'none'}", "", f"`{result['command']}`"]
    if not args.timeline_only:
        lines += ["", f"Context pass by cuDNN over {args.slots} slots ({HEADS} heads; `_flash_splits` picks "
                  f"{_flash_splits(args.slots, HEADS, 64)} blocks for 64 queries)", "",
                  "| rows x queries | key blocks per head | device us | of read stream | kernels |", "|---|---|---|---|---|"]
        for rows, per_row in ((1, 64), (64, 1), (1, 1)):
            for splits in (1, 2, 4, 8, 16, 32, 64):
                r = flash_case(rows, per_row, args.slots, splits, args.calls)
                result["flash"].append(r)
                frac = r["bytes"] / read_bw / (r["device_us"] * 1e-6)
                lines.append(f"| {rows} x {per_row} | {splits} | {r['device_us']:.1f} | {frac:.0%} | {r['kernels']:.0f} |")
        lines += ["", "Matmuls of 64 rows (bf16 weights read once)", "",
                  "| matmul | K x N | contraction parts | device us | of read stream | kernels |", "|---|---|---|---|---|---|"]
        for name, (kdim, n) in MATMULS.items():
            for split in (1, 2, 4, 8):
                r = matmul_case(name, 64, split, args.calls)
                result["matmuls"].append(r)
                frac = r["bytes"] / read_bw / (r["device_us"] * 1e-6)
                lines.append(f"| {name} | {kdim} x {n} | {split} | {r['device_us']:.1f} | {frac:.0%} | {r['kernels']:.0f} |")
    lines += extend_timelines(args.calls)
    print("\n".join(lines))
    bc.write(args.out, "probe_extend_timeline" if args.timeline_only else "probe_extend_kernels", result,
             "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
