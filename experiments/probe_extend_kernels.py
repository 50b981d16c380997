"""Probe: the device time of `extend`'s two heaviest kernel kinds for a 64-token question on a shared
32K-token context (Llama-2-7B shape, bf16), against the read stream measured in the same run.

1. The context pass by cuDNN (`slot_attention._flash_part`): 64 queries of 32 heads over 32K context
   slots, split into n key blocks per head (n = 1 .. 64; `_flash_splits` picks 16 for this shape), so
   the kernel's work items are 32 n; also the same for 64 rows of one query each (a Q=64 decode step)
   and for one row of one query (a Q=1 decode step).
2. The M=64 matmuls of one layer (fused Q/K/V 4096x12288, output 4096x4096, fused gate/up 4096x22016,
   down 11008x4096): XLA's dot as the model writes it, and split along the contraction into s parts
   (a batched dot into s float32 partial products, then their sum), s = 2, 4, 8.

Each figure is the device time per call (profiler trace, `bench_common.device_times`) and the bytes the
call must read over it, as a fraction of the read stream. Writes probe_extend_kernels.{json,md}.

    PYTHONPATH=$PWD python3 experiments/probe_extend_kernels.py --out $OUT
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from bench_shared_context import read_bandwidth  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--slots", type=int, default=32768)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    read_bw = read_bandwidth(4 << 30)
    result = dict(bc.stamp(), xla_flags=os.environ.get("XLA_FLAGS", ""), read_bw=read_bw, flash=[], matmuls=[])
    lines = [f"# extend's heavy kernels: {result['device']}, jax {result['jax']}, {result['date']}; read stream "
             f"{read_bw / 1e12:.2f} TB/s; XLA_FLAGS={result['xla_flags'] or 'none'}", "",
             f"`{result['command']}`", "",
             f"Context pass by cuDNN over {args.slots} slots ({HEADS} heads; `_flash_splits` picks "
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
    print("\n".join(lines))
    bc.write(args.out, "probe_extend_kernels", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
