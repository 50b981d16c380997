"""What the prefill benchmarks share: the model shapes, random bf16 weights built without a float32 copy,
the ceilings measured in the same run (bf16 matmul rate, cuDNN causal attention rate, copy bandwidth),
a median timer, FLOP counts, and result files stamped with command, device and date.

Every figure a benchmark reports is a ratio against a ceiling measured by the same process (METHOD.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from snapkv_jax.config import ModelConfig
from snapkv_jax.pallas import dispatch
from snapkv_jax.models.llama import param_shapes

GIB = 2**30


def shapes() -> dict[str, ModelConfig]:
    """The 7B-class shapes the issues name; max positions raised so long prompts are allowed."""
    llama3 = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                         num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001)
    return {"llama2-7b": ModelConfig.llama2_7b(), "mistral-7b": ModelConfig.mistral_7b(), "llama3-8b": llama3,
            "tiny": ModelConfig.tiny()}  # for trying a script on the CPU


def llama2_label(quick: bool = False, fused: bool = False) -> str:
    """The `model` field of a Llama-2-7B-shape result: with --quick's 2 layers and the fused layout named."""
    return ("llama2-7b shape" + (" (2 layers, --quick)" if quick else "")
            + (", fused Q/K/V and gate/up" if fused else ""))


def with_positions(cfg: ModelConfig, positions: int) -> ModelConfig:
    return dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, positions))


def random_params(cfg: ModelConfig, seed: int = 0, fused: bool = False):
    """Random bf16 params (norm scales 1) made leaf by leaf from 16-bit random bits: each weight is
    +-(1 + m/128) 2^-7 for a random sign and 7-bit mantissa m (|w| in [0.0078, 0.0156)). Building them
    allocates no float32 copy, so a process's peak memory is not inflated by the set-up. `fused`: in
    `sk.fuse_projections`' layout, made directly (no second copy of the projections while fusing)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(param_shapes(cfg, jnp.bfloat16, fused=fused))

    @functools.partial(jax.jit, static_argnums=(1,))
    def weights(key, shape):
        bits = jax.random.bits(key, shape, jnp.uint16)
        return jax.lax.bitcast_convert_type((bits & 0x807F) | 0x3C00, jnp.bfloat16)

    out = []
    for i, (path, leaf) in enumerate(leaves):
        if "norm" in jax.tree_util.keystr(path):
            out.append(jnp.ones(leaf.shape, jnp.bfloat16))
        else:
            out.append(weights(jax.random.key(seed * 1000 + i), leaf.shape))
    return jax.tree_util.tree_unflatten(tree, out)


def timed(fn, reps: int = 3, warmup: int = 1) -> float:
    """Median seconds of `fn()` (blocking on its result) after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fastest(fn, reps: int = 10, warmup: int = 2) -> float:
    """Fewest seconds of `fn()` (blocking on its result) after `warmup` calls. For ceilings: the best rate
    the device showed (a median let one slow run of a read stream put decode steps "below" its ceiling)."""
    timed(fn, reps=1, warmup=warmup)
    return min(timed(fn, reps=1, warmup=0) for _ in range(reps))


def trace(run, options=None):
    """The `jax.profiler.ProfileData` of a trace of `run()` (which waits for the work it queues), taken
    with `options` (a `jax.profiler.ProfileOptions`; None: the defaults)."""
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, profiler_options=options)
        run()
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
        return jax.profiler.ProfileData.from_file(path)


def kernel_events(data) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(name, start ns, duration ns) of every kernel on the GPU's stream lines of the trace `data`
    (`trace`), and the line names."""
    events, names = [], []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            names.append(line.name)
            if line.name.startswith("Stream"):
                events += [(e.name, int(e.start_ns), int(e.duration_ns)) for e in line.events]
    return events, names


def busy_ns(events) -> int:
    """Length of the union of the events' intervals."""
    total, end = 0, None
    for _, start, dur in sorted(events, key=lambda e: e[1]):
        if end is None or start > end:
            total += dur
            end = start + dur
        elif start + dur > end:
            total += start + dur - end
            end = start + dur
    return total


# XLA's own kernels in a GPU trace (fusions, copies, library GEMMs); the rest are custom calls (Pallas).
_XLA_KERNEL = re.compile(r"^(loop_|input_|wrapped_|copy|fusion|gemm|dynamic_|concatenate|transpose|reduce|"
                         r"select|pad|slice|cutlass|sm\d+_xmma|nvjet|cudnn)")


def device_times(fn, inputs, calls: int) -> dict:
    """Device time per call of `fn(*inputs[i % len(inputs)])`, `calls` calls under a `jax.profiler`
    trace (the GPU's own kernel timestamps, so host dispatch is not in it): `busy_s` the union of every
    kernel's interval (the whole call's device work), `custom_s` the custom-call kernels' time (Pallas
    kernels: names XLA does not give its own), `kernels` per call."""
    events, _ = kernel_events(trace(lambda: jax.block_until_ready([fn(*inputs[i % len(inputs)])
                                                                 for i in range(calls)])))
    custom = sum(dur for name, _, dur in events if not _XLA_KERNEL.match(name))
    return dict(busy_s=busy_ns(events) / calls / 1e9, custom_s=custom / calls / 1e9, kernels=len(events) / calls)


def matmul_rate(n: int = 8192) -> float:
    """bf16 FLOP/s of an n^3 matmul."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
    f = jax.jit(jnp.matmul)
    return 2 * n**3 / timed(lambda: f(a, b), reps=10, warmup=2)


def attention_implementation() -> str:
    """cuDNN on a GPU (what prefill uses there), the `jnp` reference elsewhere."""
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


def attention_rate(tokens: int = 16384, heads: int = 32, kv_heads: int = 8, d: int = 128) -> float:
    """cuDNN causal flash-attention FLOP/s (4 T^2/2 H D: QK^T and PV over the causal half)."""
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (1, tokens, heads, d), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (1, tokens, kv_heads, d), jnp.bfloat16) for kk in ks[1:])
    f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                             implementation=attention_implementation()))
    return causal_attention_flops(tokens, heads, d) / timed(lambda: f(q, k, v), reps=10, warmup=2)


def copy_bandwidth() -> float:
    x = jax.random.normal(jax.random.key(0), (256 << 20,), jnp.bfloat16)
    f = jax.jit(lambda x: -x)
    return 2 * x.nbytes / fastest(lambda: f(x))


def linear_params(cfg: ModelConfig) -> int:
    """Weights a token multiplies through: every layer's projections and MLP (not the embedding)."""
    attn = cfg.hidden_size * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim \
        + cfg.num_heads * cfg.head_dim * cfg.hidden_size
    return cfg.num_layers * (attn + 3 * cfg.hidden_size * cfg.intermediate_size)


def kvzip_reconstruction_flops(cfg: ModelConfig, tokens: int, method) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) of KVzip's reconstruction pass over a `tokens`-token prompt: its
    `n` chunks of `r` tokens (`method.layout`) through every linear layer, each chunk's queries over the
    whole context and causally over itself, and the scoring pass over the sinks, the chunk's context
    window and the chunk itself."""
    n, cw, r = method.layout(tokens)
    h, d, layers = cfg.num_heads, cfg.head_dim, cfg.num_layers
    linear = 2 * linear_params(cfg) * n * r
    scores = layers * n * 2 * r * (method.sinks + cw + r) * h * d
    attention = layers * n * (4 * r * tokens + 2 * r * r) * h * d
    return float(linear + scores), float(attention)


def causal_attention_flops(tokens: int, heads: int, d: int, window: int | None = None) -> float:
    """QK^T and PV over the causal part of T x T (a sliding window W: about T W of it)."""
    pairs = tokens * tokens / 2 if window is None or window >= tokens else tokens * window - window**2 / 2
    return 4 * pairs * heads * d


def prefill_bound_s(cfg: ModelConfig, tokens: int, matmul_flops: float, attention_flops_rate: float,
                    batch: int = 1) -> float:
    """Matmul FLOPs at the measured matmul rate + causal attention FLOPs at the measured cuDNN rate (the
    last position's logits only: prefill needs no full-vocabulary head)."""
    matmul = 2 * linear_params(cfg) * tokens * batch
    attention = cfg.num_layers * causal_attention_flops(tokens, cfg.num_heads, cfg.head_dim,
                                                        cfg.sliding_window) * batch
    return matmul / matmul_flops + attention / attention_flops_rate


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def stamp() -> dict:
    """Command, device, versions, UTC date and the scoring kernels' back-ends "auto" tries here, best
    first (`dispatch.kernel_order`; empty off GPU, where "auto" takes the `jnp` reference), for a result
    file."""
    capability = dispatch.gpu_capability()
    kernels = {k: list(dispatch.kernel_order(k, capability)) if capability is not None else []
               for k in dispatch.HOPPER_BACKENDS}
    return dict(command=" ".join([os.path.basename(sys.executable), *sys.argv]),
                device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                kernel_backends=kernels)


def write(out: str, name: str, result: dict, table: str | None = None) -> None:
    """`out/name.json` (and `name.md` with the table), written whole: a temporary file renamed into
    place, so an interrupted run never leaves half a file."""
    os.makedirs(out, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=1)), (".md", table)):
        if text is None:
            continue
        path = os.path.join(out, name + suffix)
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)


def shapes_parser(doc: str, reps: int) -> argparse.ArgumentParser:
    """The options of a benchmark over shapes and prompt lengths: --shapes, --lengths, --reps, --out."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["llama2-7b", "mistral-7b"])
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--out", default="experiments/results")
    return p
