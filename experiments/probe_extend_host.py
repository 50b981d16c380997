"""Probe: where the host time of `extend` of one 64-token question onto a shared 32K-token context goes
(Llama-2-7B shape, bf16, random weights). For a full and a SnapKV C=1024 context: the host and wall time
per call, the host time split at the embedding program's and the layer programs' dispatch, and cProfile
tables over repeated calls; then the host cost of three small steps such a call takes (a `device_put` of
small arrays, a jitted call taking numpy arrays, `kv.create`). Writes probe_extend_host.txt.

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

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from bench_shared_context import context_cache  # noqa: E402

import snapkv_jax as sk  # noqa: E402
from snapkv_jax import layer_prefill  # noqa: E402
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args(argv)
    cfg = bc.with_positions(sk.ModelConfig.llama2_7b(), args.context + 4096)
    params = jax.block_until_ready(bc.random_params(cfg))
    report = io.StringIO()
    for mode, held in (("full", args.context), ("snapkv", 1024)):
        ctx = jax.block_until_ready(context_cache(cfg, held, args.context))
        q = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 64)).astype(np.int32)
        ext = functools.partial(_extend, params, cfg, None, q, None, compress=None, max_slots=None, chunk="auto",
                                context=ctx, mesh=None, reserve=0, what="the question")
        host, wall = host_and_wall_ms(ext, args.calls, warmup=3)
        print(f"{mode}: host ms {host:.2f}, wall ms {wall:.2f}", file=report)
        marks = {}
        real_run, real_embed = segment.run, layer_prefill._embed

        def run(*a, **k):
            marks["run"] = time.perf_counter()
            out = real_run(*a, **k)
            marks["ran"] = time.perf_counter()
            return out

        def embed(*a, **k):
            marks["embed"] = time.perf_counter()
            return real_embed(*a, **k)
        segment.run, layer_prefill._embed = run, embed
        split = []
        for _ in range(args.calls):
            start = time.perf_counter()
            out = ext()
            end = time.perf_counter()
            jax.block_until_ready(out)
            split.append([marks["embed"] - start, marks["run"] - marks["embed"], marks["ran"] - marks["run"],
                          end - marks["ran"]])
        segment.run, layer_prefill._embed = real_run, real_embed
        print(f"{mode}: host ms until embed, embed, run, after: "
              f"{', '.join(f'{x * 1e3:.2f}' for x in np.median(split, axis=0))}", file=report)
        prof = cProfile.Profile()
        for _ in range(args.calls):
            prof.enable()
            out = ext()
            prof.disable()
            jax.block_until_ready(out)
        for key in ("cumulative", "tottime"):
            pstats.Stats(prof, stream=report).sort_stats(key).print_stats(12)
        del ctx
    small = [np.zeros((1, 64), np.int32), np.zeros((1,), np.int32), np.zeros((32, 1), np.int32)]
    put = jax.jit(lambda *a: a)
    for name, fn in (("device_put of 3 small arrays", lambda: jax.device_put(small)),
                     ("jit taking 3 small numpy arrays", lambda: put(*small)),
                     ("kv.create batch 1, 0 slots", lambda: kv.create(cfg, 1, 0, jax.numpy.bfloat16))):
        print(f"{name}: host ms {host_and_wall_ms(fn, 50, warmup=5)[0]:.3f}", file=report)
    print(report.getvalue())
    with open(os.path.join(args.out, "probe_extend_host.txt"), "w") as f:
        f.write(f"{bc.stamp()}\n{report.getvalue()}")


if __name__ == "__main__":
    main()
