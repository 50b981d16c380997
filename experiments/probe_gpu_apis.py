"""Probe of the GPU machine's JAX before designing chunked prefill and fixing SnapKV's compile time.

Answers, in one run:
  1. Does the cuDNN flash-attention entry point under `jax.nn.dot_product_attention` take the head-major
     (BNTH) layout and return the log-sum-exp in float32? (`jax.nn` casts it to the output dtype, which
     for bf16 is too coarse to merge two partial attentions.) Checked against a float32 XLA reference.
  2. Does cuDNN skip key blocks past `kv_seqlen` (cost proportional to the real keys), or pay for the
     padded length? Decides whether chunked attention can use one static key buffer.
(An earlier version also timed the compilation of the unrolled whole-model prefill that
snapkv_jax/layer_prefill.py replaced; its figures stay in the JSON, marked as such.)

    PYTHONPATH=$PWD python3 experiments/probe_gpu_apis.py --out $OUT
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def _timeit(fn, reps=20):
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def probe_cudnn(report):
    from jax._src.cudnn import fused_attention_stablehlo as fa
    report["cudnn_signature"] = str(inspect.signature(fa.dot_product_attention))
    rng = np.random.default_rng(0)
    b, h, t, s, d = 1, 8, 256, 1024, 128
    q = jnp.asarray(rng.standard_normal((b, h, t, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, h, s, d)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, h, s, d)), jnp.bfloat16)
    scale = 1 / np.sqrt(d)
    out, lse = jax.jit(lambda q, k, v: fa.dot_product_attention(
        q, k, v, scale=scale, mask_type=fa.MaskType.NO_MASK, qkv_layout="BNTH", return_residual=True))(q, k, v)
    logits = jnp.einsum("bhtd,bhsd->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    ref_lse = jax.nn.logsumexp(logits, axis=-1)
    ref_out = jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(logits, -1), v.astype(jnp.float32))
    report["cudnn_bnth"] = dict(
        out_shape=list(out.shape), lse_shape=list(lse.shape), lse_dtype=str(lse.dtype),
        lse_max_abs_err=float(jnp.max(jnp.abs(lse.reshape(ref_lse.shape) - ref_lse))),
        out_rel_err=float(jnp.linalg.norm(out.astype(jnp.float32) - ref_out) / jnp.linalg.norm(ref_out)))
    # Causal with T != S: which alignment?
    qc = q[:, :, :128]
    kc, vc = k[:, :, :128], v[:, :, :128]
    outc = jax.jit(lambda q, k, v: fa.dot_product_attention(
        q, k, v, scale=scale, mask_type=fa.MaskType.CAUSAL, qkv_layout="BNTH"))(qc, kc, vc)
    lg = jnp.einsum("bhtd,bhsd->bhts", qc.astype(jnp.float32), kc.astype(jnp.float32)) * scale
    lg = jnp.where(jnp.tril(jnp.ones((128, 128), bool)), lg, -jnp.inf)
    refc = jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(lg, -1), vc.astype(jnp.float32))
    report["cudnn_causal_square_rel_err"] = float(
        jnp.linalg.norm(outc.astype(jnp.float32) - refc) / jnp.linalg.norm(refc))

    # 2. Padding: is the cost proportional to kv_seqlen?
    b, h, t, d = 1, 32, 4096, 128
    timings = {}
    for s in (16384, 65536):
        q = jnp.asarray(rng.standard_normal((b, h, t, d)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((b, h, s, d)), jnp.bfloat16)
        v = k
        for real in (s // 8, s):
            qlen = jnp.full((b,), t, jnp.int32)
            klen = jnp.full((b,), real, jnp.int32)
            f = jax.jit(lambda q, k, v, ql, kl: fa.dot_product_attention(
                q, k, v, q_seqlen=ql, kv_seqlen=kl, scale=scale, mask_type=fa.MaskType.PADDING,
                qkv_layout="BNTH"))
            timings[f"S={s} kv_seqlen={real}"] = _timeit(lambda: f(q, k, v, qlen, klen))
        f = jax.jit(lambda q, k, v: fa.dot_product_attention(q, k, v, scale=scale, qkv_layout="BNTH"))
        timings[f"S={s} no mask, static S/8"] = _timeit(lambda: f(q, k[:, :, : s // 8], v[:, :, : s // 8]))
    report["cudnn_padding_seconds"] = timings


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    args = p.parse_args()
    report = dict(jax=jax.__version__, device=str(jax.devices()[0].device_kind))
    for probe in (probe_cudnn,):
        try:
            probe(report)
        except Exception as e:  # a probe reports what failed and the next one still runs
            report[probe.__name__ + "_error"] = f"{type(e).__name__}: {e}"[:2000]
    with open(os.path.join(args.out, "probe_gpu_apis.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
