"""H2O's key scores for one prompt chunk: what is computed, and the `jnp` references every kernel back-end
is tested against (h2o_scores_triton.py, Pallas Triton; dispatch.py picks one).

What is computed (H2O, Zhang et al., arXiv 2306.14048, in its prefill form): for the queries of positions
start .. start+c-1 of row b (those below L = lengths[b]; the rest are padding) and every key j,

    scores[b, h, j] = sum_i softmax_j(q[b, h, i] . k[b, h // G, :] / sqrt(D))[j]    over queries i >= j

with the causal softmax in float32. The sum over all chunks of a prompt is the attention key j receives
from every prompt query that sees it.

Invariants every back-end keeps (tests/test_pallas_h2o_scores.py checks each against the reference):
  * output `[B, H, T]` float32; zero for keys no real query of the chunk sees (j > start + c - 1, j >= L);
  * queries at positions >= lengths[b] add nothing, and keys past them are never read unmasked, so
    padding may hold anything;
  * float32 inputs use IEEE float32 dots, bfloat16 inputs bf16 dots; accumulation is float32 always.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def chunk_logits(q_chunk: jax.Array, keys: jax.Array, start) -> jax.Array:
    """`[B, H, c, T]` float32 logits q.k / sqrt(D) of the chunk's queries, -inf where a key is after the
    query (causal). q_chunk `[B, H, c, D]` at positions start .., keys `[B, K, T, D]` (query head h reads
    KV head h // G; repeated per query head here, a temporary, because XLA's CPU backend runs flat-head
    einsums about twice as fast as grouped ones)."""
    c, d = q_chunk.shape[2:]
    keys = jnp.repeat(keys.astype(q_chunk.dtype), q_chunk.shape[1] // keys.shape[1], axis=1)  # [B, H, T, D]
    # float32 inputs: exact float32 products; bf16 inputs (a bf16 model): tensor-core products of the
    # bf16 values the model itself attends with, accumulated in float32.
    precision = lax.Precision.HIGHEST if q_chunk.dtype == jnp.float32 else lax.Precision.DEFAULT
    logits = jnp.einsum("bhcd,bhtd->bhct", q_chunk, keys, precision=precision,
                        preferred_element_type=jnp.float32) / math.sqrt(d)       # [B, H, c, T]
    visible = jnp.arange(keys.shape[2])[None, :] <= (start + jnp.arange(c))[:, None]  # [c, T]
    return jnp.where(visible, logits, -jnp.inf)


def chunk_lse_reference(q_chunk: jax.Array, keys: jax.Array, start) -> jax.Array:
    """`[B, H, c]` float32 natural log-sum-exp of each query's causal logits (what the kernel takes)."""
    return jax.nn.logsumexp(chunk_logits(q_chunk, keys, start), axis=-1)


def chunk_scores_reference(q_chunk: jax.Array, keys: jax.Array, lengths: jax.Array, start) -> jax.Array:
    """`[B, H, T]` float32: the attention the queries of positions start .. start+c-1 pay each key,
    summed over those queries. q_chunk `[B, H, c, D]` (after RoPE, unscaled), keys `[B, K, T, D]`.

    A query at position p sees keys j <= p; queries at p >= lengths[b] are padding and add nothing. Keys
    past a row's last real query get 0. Softmax in float32. Plain `jnp`, materialising `[B, H, c, T]`.
    """
    c = q_chunk.shape[2]
    p = jax.nn.softmax(chunk_logits(q_chunk, keys, start), axis=-1)              # every query sees itself
    real = (start + jnp.arange(c))[None, :] < lengths[:, None]                   # [B, c]
    return jnp.sum(jnp.where(real[:, None, :, None], p, 0.0), axis=2)
