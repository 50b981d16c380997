"""Probe: where the host time of `extend` of one 64-token question onto a shared 32K-token context goes
(Llama-2-7B shape, bf16, random weights). For a full and a SnapKV C=1024 context: the host and wall time
per call (then, alternating three times, with the layer programs' index a cached device scalar, as now,
and a NumPy scalar, as before 2026-12-04), the host time split at the layer programs' dispatch (the first
of which unpacks the call's one transferred array and embeds), cProfile tables over repeated calls, and
the host threads' events of a `jax.profiler` trace of such calls (XLA's own names, inclusive ms per
call); the host and wall time of `prefill` of a 64-token prompt (32 layer programs), alternating the
same way; then the host cost of small steps such calls take (`device_put` of 1, 3 and 9 small arrays, a
jitted call given a NumPy or a device scalar, `kv.create`). Writes probe_extend_host.txt.

    PYTHONPATH=$PWD python3 experiments/probe_extend_host.py --out $OUT
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import os
import pstats
import sys
import time
from collections import defaultdict

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from bench_shared_context import context_cache  # noqa: E402

import snapkv_jax as sk  # noqa: E402
from snapkv_jax import sharding  # noqa: E402
from snapkv_jax import cache as kv  # noqa: E402
from snapkv_jax.generate import _extend, segment  # noqa: E402  (the module; sk.extend is the function)


def host_and_wall_ms(fn, calls: int, warmup: int) -> tuple[float, float]:
    """Median ms of `fn()` until it returns (host) and until its result is ready (wall)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    host, wall = [], []
    for _ in range(calls):
        start = time.perf_counter()
        out = fn()
        host.append(time.perf_counter() - start)
        jax.block_until_ready(out)
        wall.append(time.perf_counter() - start)
    return float(np.median(host)) * 1e3, float(np.median(wall)) * 1e3


def host_events(fn, calls: int, top: int) -> list[str]:
    """The `top` event names of the host threads in a trace of `calls` calls of `fn()`, by inclusive ms
    per call (nested events each count their whole span), with their count per call."""
    data = bc.trace(lambda: [jax.block_until_ready(fn()) for _ in range(calls)])
    total, count = defaultdict(int), defaultdict(int)
    for plane in data.planes:
        if plane.name.startswith("/host"):
            for line in plane.lines:
                for e in line.events:
                    total[e.name] += int(e.duration_ns)
                    count[e.name] += 1
    names = sorted(total, key=total.get, reverse=True)[:top]
    return [f"{total[n] / calls / 1e6:8.3f} ms {count[n] / calls:7.1f}x  {n[:110]}" for n in names]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args(argv)
    cfg = bc.with_positions(sk.ModelConfig.llama2_7b(), args.context + 4096)
    params = jax.block_until_ready(bc.random_params(cfg))
    report = io.StringIO()
    real_index = sharding.layer_index
    for mode, held in (("full", args.context), ("snapkv", 1024)):
        ctx = jax.block_until_ready(context_cache(cfg, held, args.context))
        q = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 64)).astype(np.int32)
        ext = functools.partial(_extend, params, cfg, None, q, None, compress=None, max_slots=None, chunk="auto",
                                context=ctx, mesh=None, reserve=0, what="the question")
        host, wall = host_and_wall_ms(ext, args.calls, warmup=3)
        print(f"{mode}: host ms {host:.2f}, wall ms {wall:.2f}", file=report)
        for rnd in range(3):  # the layer programs' index as a cached device scalar (now) or a NumPy one (before)
            for name, index in (("device", real_index), ("numpy", np.int32)):
                sharding.layer_index = index
                host, wall = host_and_wall_ms(ext, args.calls, warmup=1)
                print(f"{mode}: round {rnd}, {name} layer index: host ms {host:.2f}, wall ms {wall:.2f}", file=report)
            sharding.layer_index = real_index
        marks = {}
        real_run = segment.run

        def run(*a, **k):
            marks["run"] = time.perf_counter()
            out = real_run(*a, **k)
            marks["ran"] = time.perf_counter()
            return out
        segment.run = run
        split = []
        for _ in range(args.calls):
            start = time.perf_counter()
            out = ext()
            end = time.perf_counter()
            jax.block_until_ready(out)
            split.append([marks["run"] - start, marks["ran"] - marks["run"], end - marks["ran"]])
        segment.run = real_run
        print(f"{mode}: host ms until the layer programs (the first embeds), their dispatch, after: "
              f"{', '.join(f'{x * 1e3:.2f}' for x in np.median(split, axis=0))}", file=report)
        prof = cProfile.Profile()
        for _ in range(args.calls):
            prof.enable()
            out = ext()
            prof.disable()
            jax.block_until_ready(out)
        for key in ("cumulative", "tottime"):
            pstats.Stats(prof, stream=report).sort_stats(key).print_stats(12)
        print(f"{mode}: host events of a trace, per call", file=report)
        print("\n".join(host_events(ext, 5, 40)), file=report)
        del ctx
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 64)).astype(np.int32)
    for rnd in range(3):
        for name, index in (("device", real_index), ("numpy", np.int32)):
            sharding.layer_index = index
            host, wall = host_and_wall_ms(lambda: sk.prefill(params, cfg, prompt), args.calls, warmup=2)
            print(f"prefill of a 64-token prompt: round {rnd}, {name} layer index: host ms {host:.2f}, "
                  f"wall ms {wall:.2f}", file=report)
    sharding.layer_index = real_index
    small = [np.zeros((1, 64), np.int32), np.zeros((1,), np.int32), np.zeros((32, 1), np.int32)]
    nine = [a.copy() for a in small * 3]
    put = jax.jit(lambda *a: a)
    add = jax.jit(lambda x, i: x + i)
    x = jax.numpy.zeros((1, 64), jax.numpy.int32)
    one = jax.device_put(np.int32(1))
    for name, fn in (("device_put of 1 small array", lambda: jax.device_put(small[0])),
                     ("device_put of 3 small arrays", lambda: jax.device_put(small)),
                     ("device_put of 9 small arrays", lambda: jax.device_put(nine)),
                     ("jit taking 3 small numpy arrays", lambda: put(*small)),
                     ("jit taking a device array and a numpy scalar", lambda: add(x, np.int32(1))),
                     ("jit taking a device array and a device scalar", lambda: add(x, one)),
                     ("kv.create batch 1, 0 slots", lambda: kv.create(cfg, 1, 0, jax.numpy.bfloat16))):
        print(f"{name}: host ms {host_and_wall_ms(fn, 50, warmup=5)[0]:.3f}", file=report)
    print(report.getvalue())
    with open(os.path.join(args.out, "probe_extend_host.txt"), "w") as f:
        f.write(f"{bc.stamp()}\n{report.getvalue()}")


if __name__ == "__main__":
    main()
