"""Benchmark: SnapKV's observation-window kernels (each back-end) and the whole SnapKV step on one GPU
(DESIGN section 7).

Measured in one run, so ratios share a device and a state:
  * ceilings: a read-only stream (`jnp.sum` over `--stream-gib` GiB of bf16, bytes read) and a copy
    (`x * 2` over the same array, bytes read + written), and the bf16 matmul rate (8192^3);
  * the window-score kernel of each back-end in `--backends` (Pallas Mosaic GPU
    `snapkv_jax.pallas.window_scores_mosaic` on Hopper, Pallas Triton `window_scores_triton`; bf16,
    w=32, D=128, batch 1) for the Llama-2-7B shape (32/32 heads) and a GQA shape (32/8) at `--sizes`.
    The kernels only read keys (twice: two passes) and write small float32 scores, so their roofline is
    the read ceiling: bytes moved = 2 x keys + window queries + scores; reported as the fraction of
    that roofline the time achieves, and of the one-pass floor (keys read once) as well, plus the old
    ratio against the copy rate for comparison with earlier runs;
  * agreement of the back-ends' scores at every size (max abs difference over the largest score);
  * the full SnapKV step (scores + pooling + GQA reduce + top-k + gather of K and V) through each
    back-end, and kept sets of `select(impl=backend)` vs `select(impl="xla")` where the `jnp` path fits
    (sets that differ must still be a valid top-k under the xla scores: ties);
  * a tiling sweep of `--sweep-backends` at `--sweep-size`;
  * the step's share of prefill (`--prefill-sizes`, Llama-2-7B shape, random bf16 weights) with and
    without SnapKV, and an estimate from cuDNN causal attention time + matmul FLOPs at the measured rate.

Timing: warm-up, then the median over `--reps` repetitions of `--inner` back-to-back calls ended by
`block_until_ready` (divided by `--inner`); inputs rotate over enough copies to overflow the L2 cache.
On a GPU also the device time of the same calls from a `jax.profiler` trace (the kernels' own
timestamps): the wall time per call includes the host's dispatch, which at 16K-32K is longer than the
call's device work (inside prefill's jit there is no such dispatch, so the device time is the kernel's).
Writes JSON (command line, device, jax version, date) and a markdown table to `--out` after each
section, and prints the table last. `--quick`: two sizes, one shape, no prefill (also runs on CPU in
interpret mode, tiny).

    PYTHONPATH=$PWD python3 experiments/bench_snapkv_kernel.py --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

from snapkv_jax.compression import SnapKV  # noqa: E402
from snapkv_jax.config import ModelConfig  # noqa: E402
from snapkv_jax.pallas import dispatch  # noqa: E402
from snapkv_jax.pallas.window_scores import window_scores_reference  # noqa: E402
from snapkv_jax.snapkv import gather_kept, pool_scores, reduce_gqa, select  # noqa: E402

WINDOW, HEAD_DIM = 32, 128
SHAPES = {"llama2-7b 32/32": (32, 32), "gqa 32/8": (32, 8)}
L2_BYTES = 64 << 20  # rotate inputs until a round of them exceeds this (H100: 50 MB of L2)


def timed(fn, inputs, reps, inner):
    """Median seconds per call of fn(*inputs[i % len(inputs)]), after two warm-up rounds."""
    for args in inputs * 2:
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = [fn(*inputs[i % len(inputs)]) for i in range(inner)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def device_time(fn, inputs, read_bw, two_pass) -> dict:
    """On a GPU, the call's device time from a profiler trace (the kernels' own timestamps, no host
    dispatch), rotating over `inputs` as `timed` does: `device_s` all of the call's device work (the two
    passes and the small `jnp` steps between them), `passes_s` the Pallas kernels alone, and both as
    fractions of the read roofline. Empty off GPU."""
    if jax.default_backend() != "gpu":
        return {}
    try:
        t = bc.device_times(fn, inputs, calls=4 * len(inputs))
    except Exception as e:  # a trace that cannot be taken or read: say why, keep the wall-clock figures
        return dict(device_error=f"{type(e).__name__}: {str(e)[:200]}")
    return dict(device_s=t["busy_s"], passes_s=t["custom_s"], kernels_per_call=t["kernels"],
                frac_read_roofline_device=two_pass / read_bw / t["busy_s"],
                frac_read_roofline_passes=two_pass / read_bw / t["custom_s"])


def copies(make, nbytes):
    """Enough independent input sets that one round of them overflows the L2 cache."""
    return [make(i) for i in range(min(8, max(1, math.ceil(2 * L2_BYTES / nbytes))))]


def copy_bandwidth(args):
    n = (256 << 20) if not args.quick else (16 << 20)  # bf16 elements: 512 MiB
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    t = timed(jax.jit(lambda x: -x), [(x,)], args.reps, args.inner)
    return 2 * x.nbytes / t


def stream_ceilings(args):
    """(read, copy) bytes per second over one array of `args.stream_gib` GiB of random bf16: `jnp.sum`
    (float32 accumulation) reads it once; `x * 2` reads and writes it (both counted)."""
    n = int(args.stream_gib * 2**30) // 2 if not args.quick else 16 << 20
    bits = jax.jit(lambda key: jax.random.bits(key, (n,), jnp.uint16), static_argnums=())(jax.random.key(0))
    x = jax.lax.bitcast_convert_type((bits & 0x807F) | 0x3C00, jnp.bfloat16)  # +-[1, 2): no float32 copy
    del bits
    read = x.nbytes / timed(jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), [(x,)], args.reps, args.inner)
    copy = 2 * x.nbytes / timed(jax.jit(lambda x: x * 2), [(x,)], args.reps, args.inner)
    return read, copy


def matmul_rate(args):
    n = 8192 if not args.quick else 1024
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
    t = timed(jax.jit(jnp.matmul), [(a, b)], args.reps, args.inner)
    return 2 * n**3 / t


def make_inputs(heads, kv_heads, tokens, seed):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (1, heads, WINDOW, HEAD_DIM), jnp.bfloat16)    # [B, H, w, D]
    k = jax.random.normal(ks[1], (1, kv_heads, tokens, HEAD_DIM), jnp.bfloat16)  # [B, K, T, D]
    v = jax.random.normal(ks[2], (1, kv_heads, tokens, HEAD_DIM), jnp.bfloat16)
    return q, k, v, jnp.asarray([tokens], jnp.int32)


def kept_sets_agree(q, k, lengths, snap, backend):
    """(identical, valid): whether select via the back-end's kernel equals select via jnp, and if not,
    whether the kernel's kept prefix is still a top-k of the jnp path's pooled, reduced scores (ties)."""
    via_kernel = np.asarray(select(q, k, lengths, snap, impl=backend))
    via_xla = np.asarray(select(q, k, lengths, snap, impl="xla"))
    if (via_kernel == via_xla).all():
        return True, True
    prefix = int(lengths[0]) - snap.window
    scores = reduce_gqa(pool_scores(window_scores_reference(q, k, lengths), lengths - snap.window,
                                    snap.kernel, snap.pooling), k.shape[1], snap.gqa_reduce)
    scores = np.asarray(scores)[0, :, :prefix]                                    # [K, P]
    valid = True
    for head in range(k.shape[1]):
        kept = via_kernel[0, head][via_kernel[0, head] < prefix]
        dropped = np.setdiff1d(np.arange(prefix), kept)
        tol = 1e-3 * scores[head].max()
        top_k = scores[head][kept].min() >= scores[head][dropped].max() - tol
        valid &= len(kept) == snap.prefix_budget and top_k
    return False, bool(valid)


def kernel_fn(backend):
    """The back-end's window-score kernel (interpreted off GPU), or None when it cannot run here."""
    module = dispatch._module("window_scores", backend)
    if module is None:
        return None
    interpret = jax.default_backend() != "gpu"
    return lambda q, k, l, **tiling: module.window_scores(q, k, l, interpret=interpret, **tiling)


SWEEP = {"triton": [dict(), dict(num_stages=3), dict(num_warps=8), dict(block_k=32), dict(block_k=64),
                    dict(block_k=128), dict(programs=512), dict(programs=4096)],
         "mosaic": [dict(), dict(stages=3), dict(stages=4), dict(block_k=128), dict(programs=256),
                    dict(programs=512), dict(programs=768), dict(programs=2048), dict(stages=3, programs=512)]}


def traffic(heads, kv_heads, tokens):
    """(bytes of the two passes, bytes of the one-pass floor): keys read twice or once, plus the window
    queries read and the float32 scores written."""
    key_bytes = kv_heads * tokens * HEAD_DIM * 2
    extra = heads * WINDOW * HEAD_DIM * 2 + heads * tokens * 4
    return 2 * key_bytes + extra, key_bytes + extra


def sweep_rows(args, read_bw):
    """Tiling variants of each sweep back-end at one size, each checked against its default variant."""
    rows = []
    for backend in args.sweep_backends:
        fn = kernel_fn(backend)
        if fn is None:
            continue
        for name, (heads, kv_heads) in SHAPES.items():
            two_pass, _ = traffic(heads, kv_heads, args.sweep_size)
            inputs = copies(lambda i: make_inputs(heads, kv_heads, args.sweep_size, i), two_pass)
            q, k, _, l = inputs[0]
            base = fn(q, k, l)
            for variant in SWEEP[backend]:
                call = jax.jit(lambda q, k, l, v=tuple(variant.items()): fn(q, k, l, **dict(v)))
                try:
                    err = float(jnp.max(jnp.abs(call(q, k, l) - base)))
                    t = timed(call, [(q, k, l) for q, k, _, l in inputs], args.reps, args.inner)
                except Exception as e:  # a variant outside what the kernel takes: say why, keep going
                    rows.append(dict(backend=backend, shape=name, tokens=args.sweep_size, variant=variant,
                                     error=f"{type(e).__name__}: {str(e)[:200]}"))
                    continue
                rows.append(dict(backend=backend, shape=name, tokens=args.sweep_size, variant=variant,
                                 kernel_s=t, max_abs_diff=err, frac_read_roofline=two_pass / read_bw / t)
                            | device_time(call, [(q, k, l) for q, k, _, l in inputs], read_bw, two_pass))
                print(json.dumps(rows[-1]), flush=True)
            del inputs, base
    return rows


def kernel_rows(args, read_bw, copy_bw, rows, save):
    """Appends one row per (shape, size, back-end) to `rows`, calling `save` after each."""
    snap = SnapKV()
    xla_fn = jax.jit(lambda q, k, l: select(q, k, l, snap, impl="xla"))
    backends = [b for b in args.backends if kernel_fn(b) is not None]
    scores_fns = {b: jax.jit(kernel_fn(b)) for b in backends}
    step_fns = {b: jax.jit(lambda q, k, v, l, b=b: gather_kept(k, v, select(q, k, l, snap, impl=b)))
                for b in backends}
    for name, (heads, kv_heads) in SHAPES.items():
        if args.quick and name != next(iter(SHAPES)):
            continue
        for tokens in args.sizes:
            two_pass, one_pass = traffic(heads, kv_heads, tokens)
            if two_pass > args.max_kv_gib * 2**30:
                continue
            inputs = copies(lambda i: make_inputs(heads, kv_heads, tokens, i), two_pass)
            q, k, _, l = inputs[0]
            first = None
            for backend in backends:
                row = dict(backend=backend, shape=name, heads=heads, kv_heads=kv_heads, tokens=tokens)
                scores = scores_fns[backend](q, k, l)
                if first is None:
                    first = (backend, scores)
                else:  # the back-ends agree on these inputs (the GPU tests cover only T <= 300)
                    row["vs"] = first[0]
                    row["max_abs_diff_over_max"] = float(jnp.max(jnp.abs(scores - first[1])) / jnp.max(first[1]))
                t = timed(scores_fns[backend], [(q, k, l) for q, k, _, l in inputs], args.reps, args.inner)
                row.update(kernel_s=t, bytes_two_pass=two_pass, bytes_one_pass=one_pass,
                           bw_two_pass=two_pass / t, frac_read_roofline=two_pass / read_bw / t,
                           frac_one_pass_floor=one_pass / read_bw / t, frac_copy_bw=two_pass / t / copy_bw)
                row.update(device_time(scores_fns[backend], [(q, k, l) for q, k, _, l in inputs], read_bw, two_pass))
                if tokens <= args.step_max:
                    row["step_s"] = timed(step_fns[backend], [(q, k, v, l) for q, k, v, l in inputs], args.reps,
                                          args.inner)
                if tokens <= args.check_max:
                    row["sets_identical"], row["sets_valid"] = kept_sets_agree(q, k, l, snap, backend)
                    if backend == backends[0]:
                        row["xla_select_s"] = timed(xla_fn, [(q, k, l)], max(3, args.reps // 4), 1)
                rows.append(row)
                save()
                print(json.dumps(row), flush=True)
            del inputs, first, scores


def prefill_rows(args, matmul_flops):
    """Prefill of the Llama-2-7B shape (random bf16 weights) with and without SnapKV, and the estimate."""
    cfg = ModelConfig.llama2_7b()
    layers, heads, d = cfg.num_layers, cfg.num_heads, cfg.head_dim
    linear_params = layers * (4 * cfg.hidden_size**2 + 3 * cfg.hidden_size * cfg.intermediate_size)
    rows = []
    params = None
    for tokens in args.prefill_sizes:
        row = dict(tokens=tokens)
        # Estimate: 32 layers of cuDNN causal attention + every linear layer's FLOPs at the matmul rate.
        ks = jax.random.split(jax.random.key(tokens), 3)
        qkv = [jax.random.normal(kk, (1, tokens, heads, d), jnp.bfloat16) for kk in ks]
        attn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                    implementation="cudnn"))
        row["cudnn_attention_layer_s"] = timed(attn, [tuple(qkv)], args.reps, 2)
        row["estimate_s"] = (layers * row["cudnn_attention_layer_s"]
                             + 2 * linear_params * tokens / matmul_flops)
        del qkv
        try:
            from snapkv_jax.generate import prefill
            from snapkv_jax.models.llama import init_params
            cfg_t = dataclasses.replace(cfg, max_position_embeddings=tokens)
            if params is None:
                params = init_params(cfg_t, jax.random.key(0), jnp.bfloat16)
            prompt = np.random.default_rng(tokens).integers(0, cfg.vocab_size, (1, tokens), dtype=np.int32)
            variants = [("prefill_snapkv_s", SnapKV())]
            if args.prefill_full:
                variants.append(("prefill_full_s", None))
            for label, snap in variants:  # the model's default on GPU: cuDNN flash attention
                row[label] = timed(lambda: prefill(params, cfg_t, prompt, compress=snap), [()], 3, 1)
            # Model FLOPs: every linear layer, plus causal attention (QK^T and PV over half of T x T).
            row["model_flops"] = 2 * linear_params * tokens + 2 * layers * heads * d * tokens**2
            row["of_matmul_rate"] = row["model_flops"] / row["prefill_snapkv_s"] / matmul_flops
        except Exception as e:  # e.g. out of memory: the table says why, the kernel rows are kept
            row["prefill_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _device_cells(r) -> str:
    """The four device-time cells of a row (blank off GPU)."""
    if "device_s" not in r:
        return f"{r.get('device_error', '')} | | | "
    return (f"{r['device_s'] * 1e3:.3f} | {r['frac_read_roofline_device']:.0%} | {r['passes_s'] * 1e3:.3f} | "
            f"{r['frac_read_roofline_passes']:.0%}")


def markdown(result):
    read, copy = result["read_bandwidth_Bps"], result["copy_bandwidth_Bps"]
    lines = [f"SnapKV window-score kernels, {result['device']}, jax {result['jax']}, {result['date']}",
             f"`{result['command']}`", "",
             f"read stream (jnp.sum over {result['stream_gib']:g} GiB bf16) {read / 1e12:.2f} TB/s, copy (x * 2, "
             f"read + write) {copy / 1e12:.2f} TB/s, bf16 matmul {result['matmul_flops'] / 1e12:.0f} TFLOP/s",
             "", "Roofline of a kernel: its bytes (2 passes: keys read twice, queries, float32 scores written) "
             "at the read rate, as the kernels only read (the scores are under 2% of the bytes). "
             "'of 1-pass floor': keys read once at the read rate over the time.", "",
             "Two timings of the same calls: 'call ms', wall time per call of back-to-back calls (host "
             "dispatch included: where a call's device work is shorter than its dispatch, this is the "
             "dispatch); 'device ms', the call's device work from a profiler trace (every kernel of the call, "
             "the union of their intervals), and 'passes ms', the two Pallas kernels alone. The ratios "
             "('of read roofline') are given for each.", "",
             "| shape | L | back-end | call ms | of read roofline | device ms | of read roofline | passes ms | "
             "of read roofline | of 1-pass floor (call) | of copy rate (call) | step ms | jnp select ms | sets | diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["kernel"]:
        sets = "" if "sets_identical" not in r else (
            "identical" if r["sets_identical"] else ("ties only" if r["sets_valid"] else "WRONG"))
        xla = f"{r['xla_select_s'] * 1e3:.2f}" if "xla_select_s" in r else ""
        step = f"{r['step_s'] * 1e3:.3f}" if "step_s" in r else ""
        diff = f"{r['max_abs_diff_over_max']:.1e} vs {r['vs']}" if "vs" in r else ""
        lines.append(f"| {r['shape']} | {r['tokens'] // 1024}K | {r['backend']} | {r['kernel_s'] * 1e3:.3f} | "
                     f"{r['frac_read_roofline']:.0%} | {_device_cells(r)} | "
                     f"{r['frac_one_pass_floor']:.0%} | {r['frac_copy_bw']:.0%} | {step} | {xla} | {sets} | "
                     f"{diff} |")
    if result.get("sweep"):
        lines += ["", f"Tiling sweep at L = {result['sweep'][0]['tokens']} (default first):", "",
                  "| back-end | shape | variant | call ms | of read roofline | device ms | of read roofline | "
                  "passes ms | of read roofline | max abs diff |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["sweep"]:
            if "error" in r:
                lines.append(f"| {r['backend']} | {r['shape']} | {r['variant']} | {r['error']} | | | | | | |")
            else:
                lines.append(f"| {r['backend']} | {r['shape']} | {r['variant'] or 'default'} | "
                             f"{r['kernel_s'] * 1e3:.3f} | {r['frac_read_roofline']:.0%} | {_device_cells(r)} | "
                             f"{r['max_abs_diff']:.1e} |")
    if result.get("prefill"):
        lines += ["", "| L | step ms x 32 layers | prefill ms (SnapKV) | prefill ms (full) | share | "
                  "estimate ms (cuDNN attn + matmul) | share of estimate | prefill of matmul rate |",
                  "|---|---|---|---|---|---|---|---|"]
        steps = {r["tokens"]: r["step_s"] for r in result["kernel"]
                 if r["shape"] == "llama2-7b 32/32" and "step_s" in r and r["backend"] == result["backends"][0]}
        for r in result["prefill"]:
            step = 32 * steps.get(r["tokens"], float("nan"))
            real = r.get("prefill_snapkv_s")
            lines.append(f"| {r['tokens'] // 1024}K | {step * 1e3:.2f} | "
                         f"{real * 1e3 if real else float('nan'):.1f} | "
                         f"{r['prefill_full_s'] * 1e3 if 'prefill_full_s' in r else float('nan'):.1f} | "
                         f"{step / real if real else float('nan'):.2%} | {r['estimate_s'] * 1e3:.1f} | "
                         f"{step / r['estimate_s']:.2%} | {r.get('of_matmul_rate', float('nan')):.0%} |")
            if "prefill_error" in r:
                lines.append(f"\nprefill at {r['tokens']} did not run: {r['prefill_error']}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    on_hopper = (dispatch.gpu_capability() or (0, 0)) >= dispatch.MOSAIC_CAPABILITY
    parser.add_argument("--quick", action="store_true", help="two sizes, one shape, no prefill")
    parser.add_argument("--backends", nargs="+", default=["mosaic", "triton"] if on_hopper else ["triton"],
                        help="kernel back-ends to time, side by side (default: those of this device)")
    parser.add_argument("--sizes", type=int, nargs="*", help="prompt lengths (default 16K, 32K, 128K, 1M)")
    parser.add_argument("--prefill-sizes", type=int, nargs="*", default=[16384, 32768])
    parser.add_argument("--prefill-full", action="store_true", help="also time prefill without SnapKV")
    parser.add_argument("--sweep-size", type=int, default=32768, help="L of the tiling sweep (0: none)")
    parser.add_argument("--sweep-backends", nargs="*", default=["mosaic"] if on_hopper else ["triton"])
    parser.add_argument("--check-max", type=int, default=32768, help="largest L whose kept sets are checked")
    parser.add_argument("--step-max", type=int, default=131072, help="largest L whose whole step is timed")
    parser.add_argument("--max-kv-gib", type=float, default=40.0, help="skip sizes whose two passes exceed this")
    parser.add_argument("--stream-gib", type=float, default=8.0, help="array size of the stream ceilings")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
    args = parser.parse_args()
    if args.sizes is None:
        args.sizes = [1024, 2048] if args.quick and jax.default_backend() != "gpu" else (
            [4096, 32768] if args.quick else [16384, 32768, 131072, 1 << 20])
    if args.quick:
        args.reps, args.inner = min(args.reps, 5), min(args.inner, 2)
        args.prefill_sizes, args.sweep_size = [], 0

    device = jax.devices()[0]
    result = dict(command=" ".join([os.path.basename(sys.executable), *sys.argv]), device=device.device_kind,
                  backend=jax.default_backend(), jax=jax.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  backends=args.backends, window=WINDOW, head_dim=HEAD_DIM, dtype="bfloat16",
                  snap=dataclasses.asdict(SnapKV()), stream_gib=args.stream_gib if not args.quick else 1 / 32,
                  timing=f"call: median of {args.reps} x ({args.inner} back-to-back calls), after warm-up; device: "
                         f"a profiler trace of the same calls (GPU only)")
    os.makedirs(args.out, exist_ok=True)

    def save():  # after every section, so a run cut short still leaves its numbers
        with open(os.path.join(args.out, "snapkv_kernel_bench.json"), "w") as f:
            json.dump(result, f, indent=1)
        if "matmul_flops" in result:
            with open(os.path.join(args.out, "snapkv_kernel_bench.md"), "w") as f:
                f.write(markdown(result) + "\n")

    result["read_bandwidth_Bps"], result["copy_bandwidth_Bps"] = stream_ceilings(args)
    result["matmul_flops"] = matmul_rate(args)
    print(json.dumps({k: result[k] for k in ("device", "read_bandwidth_Bps", "copy_bandwidth_Bps",
                                             "matmul_flops")}), flush=True)
    result["kernel"], result["prefill"], result["sweep"] = [], [], []
    save()
    kernel_rows(args, result["read_bandwidth_Bps"], result["copy_bandwidth_Bps"], result["kernel"], save)
    result["sweep"] = sweep_rows(args, result["read_bandwidth_Bps"]) if args.sweep_size else []
    save()
    result["prefill"] = prefill_rows(args, result["matmul_flops"]) if args.prefill_sizes else []
    save()
    print(markdown(result))


if __name__ == "__main__":
    main()
