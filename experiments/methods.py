"""The compression methods the experiments compare, by name, each built at a KV budget.

`capacity` is the prompt slots kept per (layer, row, KV head), window and sinks included, the same
meaning for every method (DESIGN section 2), so methods are compared at equal KV-cache size. "full" is
the uncompressed cache and takes no budget. Every window-based method uses the same observation/recent
window, WINDOW = 32 (the default of SnapKV's LongBench configurations, arXiv 2404.14469, and of the
other methods' papers as implemented in `snapkv_jax.compression`).

Two forms of H2O (arXiv 2306.14048): "h2o" ranks keys by the attention summed over the prompt queries
that see them (the paper's accumulation, our default); "h2o_mean" by its average over those queries
(`normalize=True`, what kvpress's ObservedAttentionPress computes). "kvzip" (arXiv 2505.23416) builds
its reconstruction instruction from the study's tokenizer (plain completions: no chat template).
`NAMES` are the methods every study compares at full scale; `KNOWN` adds the ones particular studies add.

A method whose class `snapkv_jax` does not export (an older library) is skipped with a message on
stderr rather than failing the whole study; `available` says which ones are there.
"""

from __future__ import annotations

import sys
from typing import Callable

import snapkv_jax as sk

WINDOW = 32
SINKS = 4  # StreamingLLM's attention sinks (Xiao et al., arXiv 2309.17453)



def _kvzip(cls, c, seed, tokenizer):
    if tokenizer is None:
        raise ValueError("method 'kvzip' needs the tokenizer to spell its reconstruction instruction")
    return cls.from_tokenizer(tokenizer, capacity=c, sinks=SINKS)


# name -> (class name in snapkv_jax, constructor from (class, capacity, seed, tokenizer)).
_TABLE: dict[str, tuple[str, Callable] | None] = {
    "full": None,
    "snapkv": ("SnapKVConfig", lambda cls, c, seed, tok: cls(capacity=c, window=WINDOW)),
    "streamingllm": ("StreamingLLM", lambda cls, c, seed, tok: cls(capacity=c, sinks=SINKS)),
    "h2o": ("H2O", lambda cls, c, seed, tok: cls(capacity=c, window=WINDOW)),
    "random": ("RandomKV", lambda cls, c, seed, tok: cls(capacity=c, window=WINDOW, seed=seed)),
    "pyramidkv": ("PyramidKV", lambda cls, c, seed, tok: cls(capacity=c, window=WINDOW)),
    "adakv": ("AdaKV", lambda cls, c, seed, tok: cls(capacity=c, window=WINDOW)),
    "h2o_mean": ("H2O", lambda cls, c, seed, tok: cls(capacity=c, window=WINDOW, normalize=True)),
    "kvzip": ("KVzip", _kvzip),
}
KNOWN = tuple(_TABLE)
NAMES = ("full", "snapkv", "streamingllm", "h2o", "random", "pyramidkv", "adakv")


def available(names) -> tuple[str, ...]:
    """`names` without the methods whose class this snapkv_jax lacks; prints one line per dropped one."""
    kept = []
    for name in names:
        entry = _TABLE[name]
        if entry is not None and not hasattr(sk, entry[0]):
            print(f"experiments: skipping method {name!r}: snapkv_jax has no {entry[0]} "
                  f"(a library without the compression methods)", file=sys.stderr)
            continue
        kept.append(name)
    return tuple(kept)


def check(names, budgets) -> None:
    """Raises ValueError naming an unknown method or a budget <= WINDOW (no room beside the window)."""
    for name in names:
        if name not in _TABLE:
            raise ValueError(f"unknown method {name!r}; known: {', '.join(KNOWN)}")
    for c in budgets:
        if c <= WINDOW:
            raise ValueError(f"budget {c} must exceed the observation window ({WINDOW} tokens)")


def build(name: str, capacity: int | None, seed: int = 0, tokenizer=None):
    """The method object for `name` at `capacity` (None for "full"); `seed` feeds RandomKV's choice,
    `tokenizer` KVzip's instruction (ValueError without one)."""
    entry = _TABLE[name]
    if entry is None:
        return None
    cls_name, make = entry
    return make(getattr(sk, cls_name), capacity, seed, tokenizer)


def configs(names, budgets, length: int | None = None) -> list[tuple[str, int | None]]:
    """(method, budget) pairs to run: "full" once (budget None), every other method at every budget
    below `length` (a prompt within the budget is not compressed: it equals the full cache)."""
    out = []
    for name in names:
        if _TABLE[name] is None:
            out.append((name, None))
        else:
            out.extend((name, c) for c in budgets if length is None or c < length)
    return out


def label(name: str, capacity: int | None) -> str:
    return name if capacity is None else f"{name}@{capacity}"


# How plots name the methods whose table name does not say which form they are.
_DISPLAY = {"h2o": "h2o (summed)", "h2o_mean": "h2o (averaged)"}


def display(name: str) -> str:
    """`name` as figures show it: H2O's two forms spelled out."""
    return _DISPLAY.get(name, name)
