"""Ragged prompts through the model in right-padded batches: one compiled program per width bucket.

Prompts are grouped by `bucket_width` (the padded width `sk.generate` compiles for) and each group is
cut into batches of exactly `rows` prompts; a short last batch is filled with copies of its first prompt
(their outputs are dropped). Every batch of a bucket thus has one shape, and with a fixed `rows` a study
compiles one program per (bucket, method shape), never one per prompt. Results come back in the order of
the prompts. Decoding is greedy throughout, so results are deterministic.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

import snapkv_jax as sk
from snapkv_jax.generate import bucket_width


def batches(prompts: Sequence[Sequence[int]], rows: int):
    """Yields (indices, tokens [B, W] int32, lengths [B] int32) with B = `rows`: right-padded batches of
    one bucket width W each; `indices` lists the prompt index of each real row (rows past it are filler).
    Raises ValueError for an empty prompt."""
    by_bucket: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        by_bucket.setdefault(bucket_width(len(p)), []).append(i)
    for width in sorted(by_bucket):
        members = by_bucket[width]
        for start in range(0, len(members), rows):
            chunk = members[start:start + rows]
            picked = chunk + [chunk[0]] * (rows - len(chunk))
            tokens = np.zeros((rows, width), np.int32)                           # [B, W]
            lengths = np.array([len(prompts[i]) for i in picked], np.int32)      # [B]
            for r, i in enumerate(picked):
                tokens[r, :lengths[r]] = prompts[i]
            yield chunk, tokens, lengths


def generate(cfg, params, prompts: Sequence[Sequence[int]], method, *, max_new_tokens: int, rows: int,
             eos_id: int | None, on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy continuations (token lists, EOS included when emitted) of `prompts` under `method` (None =
    full cache), `rows` prompts per `sk.generate` call. `on_batch(n)` is called after each batch with its
    number of real prompts."""
    out: list[list[int]] = [[] for _ in prompts]
    for chunk, tokens, lengths in batches(prompts, rows):
        res = sk.generate(params, cfg, tokens, lengths, max_new_tokens=max_new_tokens, eos_id=eos_id,
                          compress=method)
        toks, n = jax.device_get((res.tokens, res.lengths))                      # [B, N], [B]
        for r, i in enumerate(chunk):
            out[i] = toks[r, :n[r]].tolist()
        if on_batch:
            on_batch(len(chunk))
    return out


def generate_after(cfg, params, prefixes: Sequence[Sequence[int]], suffixes: Sequence[Sequence[int]], method, *,
                   max_new_tokens: int, rows: int, eos_id: int | None,
                   on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy continuations of prefix + suffix where only the prefix goes through prefill (and so through
    `method`'s compression) and the suffix is fed token by token into the compressed cache: the
    question-agnostic case, where the compressor never sees the question. Batches follow the prefixes'
    buckets; suffixes are ragged, each row switching from its suffix to its own greedy tokens.
    Raises ValueError unless every prefix has one non-empty suffix."""
    if len(prefixes) != len(suffixes) or any(len(s) == 0 for s in suffixes):
        raise ValueError("need one non-empty suffix per prefix")
    donate = jax.default_backend() != "cpu"  # GPU only, as the library's loops (generate._decode_loop_program)
    out: list[list[int]] = [[] for _ in prefixes]
    for chunk, tokens, lengths in batches(prefixes, rows):
        picked = chunk + [chunk[0]] * (rows - len(chunk))
        q = max(len(suffixes[i]) for i in picked)
        suffix = np.zeros((rows, q), np.int32)                                   # [B, Q]
        suffix_len = np.array([len(suffixes[i]) for i in picked])                # [B]
        for r, i in enumerate(picked):
            suffix[r, :suffix_len[r]] = suffixes[i]
        # Room for the suffix and the answer after the widest prompt any method leaves.
        _, cache = sk.prefill(params, cfg, tokens, lengths, max_slots=tokens.shape[1] + q + max_new_tokens,
                              compress=method)
        answers: list[list[int]] = [[] for _ in picked]
        done = np.zeros(rows, bool)
        nxt = suffix[:, 0]                                                       # [B]
        for step in range(q - 1 + max_new_tokens):
            logits, cache = sk.decode_step(params, cfg, nxt, cache, donate=donate)
            pred = np.asarray(jax.device_get(logits.argmax(-1)), np.int32)      # [B]
            answering = step >= suffix_len - 1                                   # row fed its last suffix token
            for r in np.flatnonzero(answering & ~done):
                answers[r].append(int(pred[r]))
                done[r] = pred[r] == eos_id or len(answers[r]) == max_new_tokens
            if done.all():
                break
            nxt = np.where(step + 1 < suffix_len, suffix[:, min(step + 1, q - 1)], pred)
        for r, i in enumerate(chunk):
            out[i] = answers[r]
        if on_batch:
            on_batch(len(chunk))
    return out
