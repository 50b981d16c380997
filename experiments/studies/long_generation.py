"""long_generation: a long answer that needs the prompt late in the answer, under decode-time compression.

SnapKV compresses the prompt once, before generation (arXiv 2404.14469, section 4); a long answer then
grows the cache again. Decode-time compression (`generate(..., decode_compress=m, interval=I)`) keeps it
bounded by re-selecting each layer's `capacity` slots every I generated tokens, chosen by what the
answer so far attends to. The risk this study measures: facts that only the *end* of the answer needs
get evicted while its beginning is being written.

Task ("recite"): essay text with `items` key-value facts (RULER's multi-key NIAH needles, arXiv
2404.06654) at increasing depths, fact k in the k-th slice of the document; the question asks for all the
special magic numbers in the order they appear, and the answer prefix starts a numbered list ("... in
order are:\\n1."). Item k is correct when the k-th number the answer lists (digit runs of 3 or more; the
list's own labels "k." are shorter) is fact k's value, so accuracy per item index is accuracy by how late
in the answer the fact is needed (each item is about 11 tokens: 7 digits, a newline, "k. "). A sample's
score is its share of correct items (`partial`); it counts as correct (`acc`, with a Wilson interval)
when every item is.

Methods at equal live-slot budget B (the scale's `budgets`), two ways of staying within it:
  decode        each decode-time method compresses the prompt at prefill and re-selects during decoding
                with the same method object, at capacity C = B - interval, so that no layer holds more
                than C + interval = B slots (decode_compress.py: max(prompt slots, capacity) + interval);
  prefill only  the methods in `prefill_only` compress the prompt once, at C = B - (max_new_tokens - 1),
                leaving room for the whole answer: the cache then grows to at most B as well (the last
                generated token is never appended). The alternative a fixed memory budget offers without
                decode-time compression.
`full` is the uncompressed cache (its live slots reach prompt + answer). For PyramidKV and Ada-KV, C is
a mean over layers or heads (methods.py), so single layers or heads may hold more. KVzip is not a
decode-time method (its scores need a reconstruction pass over the context) and is not offered.
Per cell: accuracy overall and per item index, mean generated tokens, the live slots of the final cache
(max and mean over layers, rows and KV heads), the cache's slot count (max over layers: the buffer every
decode step writes into, so no step holds more; the peak inside the jitted loop is not observable from
outside it), and the cell's seconds. A budget at or above the context length (prompt + max_new_tokens) is
not run: the full cache fits in it.

Cells: (method, decode or prefill only, budget, length), `samples` prompts each, the same prompts for every method.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import jax
import numpy as np

import snapkv_jax as sk

from experiments import batching, methods, plots, scoring
from experiments.evaluate import decode as decode_text, record
from experiments.harness import Cell, Context, Scale, write_text
from experiments.prompts import Builder, Prompt, key_values, rng_for

NAME = "long_generation"
INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them in "
         "order. I will ask you to list them all afterwards.\n")
QUESTION = "\nList all {items} special magic numbers mentioned in the provided text, in the order they appear."
ANSWER_PREFIX = "The special magic numbers in order are:\n1."


@dataclasses.dataclass(frozen=True)
class LongGenerationScale(Scale):
    """`budgets` are live-slot budgets B (see the module docstring for each method's capacity); `items`
    facts are recited per answer; `interval` generated tokens pass between re-selections; `prefill_only`
    methods also run compressing the prompt only."""
    items: int = 8
    interval: int = 128
    prefill_only: tuple[str, ...] = ()

    # Each prefill-only cell's key names its method, so growing the list reuses the cells computed.
    AXES: ClassVar[tuple[str, ...]] = Scale.AXES + ("prefill_only",)


SCALES = {
    # Small: a 5-item answer (about 55 tokens) over a ~180-token prompt at B = 192: decode cells compress
    # the prompt to C = 160 and re-select after every 32 answer tokens. No prefill-only cells: each costs
    # one more CPU compile (~8 s) in `make test`, through the generate path every other study runs.
    "small": LongGenerationScale(methods=("full", "snapkv", "streamingllm", "h2o"), budgets=(192,),
                                 lengths=(256,), samples=2, max_new_tokens=72, batch=2, items=5, interval=32),
    # Full: 8 items (about 90 answer tokens), so interval 32 re-selects twice within the list. The default
    # 135M model recites 8 items from 1K tokens of essay far better than from 2K (CPU probe, full cache:
    # 0.47 of the items over 8 prompts at 1K, 0.13 over 4 at 2K) and 16 items from 2K worse still (0.08).
    "full": LongGenerationScale(methods=methods.NAMES, budgets=(128, 256, 512), lengths=(1024, 2048), samples=50,
                                max_new_tokens=96, batch=50, items=8, interval=32, dtype="bfloat16",
                                prefill_only=("snapkv", "streamingllm", "h2o")),
}


def validate(scale: LongGenerationScale) -> None:
    """Raises ValueError unless 1 <= items <= 99 (two-digit list labels), interval >= the methods' window,
    the answer outlasts one interval, the prefill-only methods are known compression methods, and every
    capacity (B - interval; B - (max_new_tokens - 1) with prefill-only methods) exceeds the window."""
    if not 1 <= scale.items <= 99:
        raise ValueError(f"items must be in [1, 99], got {scale.items}")
    if scale.interval < methods.WINDOW:
        raise ValueError(f"interval {scale.interval} must be >= the observation window ({methods.WINDOW})")
    if scale.max_new_tokens <= scale.interval:
        raise ValueError(f"max_new_tokens {scale.max_new_tokens} must exceed interval {scale.interval}: "
                         f"no re-selection would happen during the answer")
    methods.check(scale.prefill_only, ())
    if "full" in scale.prefill_only:
        raise ValueError("prefill_only lists compression methods; 'full' compresses nothing")
    for b in scale.budgets:
        for decode in (True,) + ((False,) if scale.prefill_only else ()):
            c = capacity(scale, b, decode)
            if c <= methods.WINDOW:
                raise ValueError(f"budget {b} leaves capacity {c}, which must exceed the observation window "
                                 f"({methods.WINDOW})")


def capacity(scale: LongGenerationScale, budget: int, decode: bool) -> int:
    """C at live-slot budget B: B - interval re-selecting while decoding, B - (max_new_tokens - 1) otherwise."""
    return budget - (scale.interval if decode else scale.max_new_tokens - 1)


def prompt(builder: Builder, seed: int, length: int, max_new_tokens: int, items: int, index: int) -> Prompt:
    """Sample `index`: `items` facts, fact k at a uniform depth in [k/items, (k+1)/items), so the document
    holds them in index order; prompt + answer fit `length`. `answers` are the values in order."""
    rng = rng_for(seed, NAME, length, items, index)
    facts = key_values(rng, items)
    depths = [(k + float(rng.random())) / items for k in range(items)]
    needles = [(d, f"One of the special magic numbers for {key} is: {value}.")
               for d, (key, value) in zip(depths, facts)]
    ids = builder.compose(rng, length - max_new_tokens, before=INTRO, needles=needles,
                          after=QUESTION.format(items=items), answer_prefix=ANSWER_PREFIX)
    return Prompt(tuple(ids), tuple(v for _, v in facts),
                  {"keys": [k for k, _ in facts], "depths": [round(d, 4) for d in depths], "tokens": len(ids)})


def recited(text: str, values) -> list[float]:
    """Per item k, 1.0 when the k-th number `text` lists (runs of >= 3 digits) is `values[k]`, else 0.0."""
    listed = re.findall(r"\d{3,}", text)
    return [float(k < len(listed) and listed[k] == v) for k, v in enumerate(values)]


def answer_offsets(builder: Builder, values) -> list[int]:
    """Token offset, in the reference answer after the prefix (" v1\\n2. v2\\n3. ..."), where each item's
    number starts: where in the answer item k is needed."""
    offsets, used = [], 0
    for k, v in enumerate(values):
        label = "" if k == 0 else f"\n{k + 1}."
        used += len(builder.ids(label))
        offsets.append(used)
        used += len(builder.ids(" " + v))
    return offsets


def recite_cell(ctx: Context, key: str, prompts: list[Prompt], method_name: str, budget: int | None,
                length: int, decode: bool = True) -> Cell:
    """`prompts` generated under `method_name` at live-slot `budget` (None: the full cache), re-selecting
    while decoding when `decode`, else compressing the prompt only; scored per item."""
    s = ctx.scale

    def compute(advance):
        c = None if budget is None else capacity(s, budget, decode)
        method = methods.build(method_name, c, seed=ctx.seed, tokenizer=ctx.tokenizer)
        outs = [None] * len(prompts)
        cache_slots = 0
        for chunk, tokens, lengths in batching.batches([p.ids for p in prompts], s.batch):
            res = sk.generate(ctx.params, ctx.cfg, tokens, lengths, max_new_tokens=s.max_new_tokens,
                              eos_id=ctx.tokenizer.eos_token_id, compress=method,
                              decode_compress=method if decode else None, interval=s.interval)
            # live: [layers, batch, kv_heads] occupied slots of the final cache
            toks, n, live = jax.device_get((res.tokens, res.lengths, sk.cache.valid_slots(res.cache)))
            for r, i in enumerate(chunk):
                outs[i] = (toks[r, :n[r]].tolist(), int(live[:, r].max()), float(live[:, r].mean()))
            cache_slots = max(cache_slots, max(k.shape[2] for k in res.cache.k))
            advance(len(chunk))
        samples, marks = [], []
        for p, (ids, live_max, live_mean) in zip(prompts, outs):
            text = decode_text(ctx.tokenizer, ids)
            items = recited(text, p.answers)
            marks.append(items)
            samples.append(record(p, text, sum(items) / len(items))
                           | {"items": items, "generated": len(ids), "live_slots": live_max,
                              "live_slots_mean": live_mean})
        return ({"method": method_name, "decode": decode and method is not None, "budget": budget, "capacity": c,
                 "length": length}
                | scoring.cell([x["score"] for x in samples])
                | {"by_item": [scoring.cell(list(col)) for col in zip(*marks)],
                   "generated_mean": float(np.mean([x["generated"] for x in samples])),
                   "live_slots": max(x["live_slots"] for x in samples),
                   "live_slots_mean": float(np.mean([x["live_slots_mean"] for x in samples])),
                   "cache_slots": cache_slots, "samples": samples})

    return Cell(key=key, size=len(prompts), compute=compute)


def run(ctx: Context) -> dict:
    s = ctx.scale
    builder = Builder(ctx.tokenizer)
    names = methods.available(s.methods)
    prefill_only = methods.available(s.prefill_only)
    cells = []
    for n in s.lengths:
        prompts = [prompt(builder, ctx.seed, n, s.max_new_tokens, s.items, i) for i in range(s.samples)]
        cells += [recite_cell(ctx, f"{methods.label(m, c)}_L{n}", prompts, m, c, n)
                  for m, c in methods.configs(names, s.budgets, length=n)]
        cells += [recite_cell(ctx, f"{methods.label(m, c)}_prefill_only_L{n}", prompts, m, c, n, decode=False)
                  for m, c in methods.configs(prefill_only, s.budgets, length=n)]
    results = list(ctx.run(cells).values())
    offsets = answer_offsets(builder, results[0]["samples"][0]["answers"])
    write_text(f"{ctx.out}/long_generation_table.md", table(s, results))
    plot(ctx, results, offsets)
    return {"methods": list(names), "prefill_only": list(prefill_only), "items": s.items, "interval": s.interval,
            "answer_offsets": offsets, "cells": results}


def _name(r: dict) -> str:
    return methods.display(r["method"]) + ("" if r["decode"] or r["budget"] is None else " (prefill only)")


def table(s: LongGenerationScale, results: list[dict]) -> str:
    """Markdown per context length: one row per method and budget; the share of samples with every item
    right (Wilson interval), the mean share of items right, accuracy per item index, and the slot counts."""
    out = []
    for n in s.lengths:
        out += [f"### {n} tokens, {s.items} items, interval {s.interval}, n={s.samples} per entry", "",
                "| method | B | C | all items | item share | " + " | ".join(f"item {k + 1}" for k in range(s.items))
                + " | live slots at end (max / mean) | cache slots | generated | seconds |",
                "|---" * (s.items + 9) + "|"]
        for r in sorted((r for r in results if r["length"] == n),
                        key=lambda r: (r["budget"] or 0, not r["decode"], r["method"])):
            out.append(f"| {_name(r)} | {r['budget'] or '-'} | {r['capacity'] or '-'} | "
                       f"{r['acc']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}] | {r['partial']:.2f} | "
                       + " | ".join(f"{c['acc']:.2f}" for c in r["by_item"])
                       + f" | {r['live_slots']} / {r['live_slots_mean']:.0f} | {r['cache_slots']} | "
                       f"{r['generated_mean']:.1f} | {r['seconds']:.1f} |")
        out.append("")
    return "\n".join(out)


def plot(ctx: Context, results: list[dict], offsets: list[int]) -> None:
    """Accuracy per item index, one panel per (length, budget): every method (prefill only dash-dotted) and
    the full cache (dashed); dotted lines where the answer passes each multiple of `interval` tokens (the
    decode cells' re-selections, placed by answer_offsets)."""
    s = ctx.scale
    panels = [(n, b) for n in s.lengths for b in s.budgets if b < n]
    fig, axes = plots.grid(len(panels))
    x = np.arange(1, s.items + 1)
    for ax, (n, b) in zip(axes, panels):
        for r in (r for r in results if r["length"] == n and r["budget"] in (None, b)):
            style = ({"color": "black", "linestyle": "--", "zorder": 3} if r["budget"] is None
                     else {} if r["decode"] else {"linestyle": "-."})
            plots.accuracy_line(ax, x, r["by_item"], "full cache" if r["budget"] is None else _name(r), **style)
        for t in range(s.interval, offsets[-1] + 1, s.interval):
            ax.axvline(1 + np.interp(t, offsets, np.arange(s.items)), color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="item k of the answer (dotted: a re-selection)", ylabel="accuracy of item k",
               ylim=(-0.03, 1.03), title=f"recite {s.items} numbers, {n} tokens, B={b} (n={s.samples})")
        ax.set_xticks(x)
        ax.legend(fontsize=7)
    ctx.save_figure(fig, "long_generation_by_item")
