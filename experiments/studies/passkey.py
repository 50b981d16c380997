"""passkey: pass-key retrieval accuracy against the KV budget, for every method, at 2K / 4K / 8K tokens.

The pass-key test (Mohtashami & Jaggi 2023, arXiv 2305.16300) hides a five-digit key at a random depth
of a repeated filler line and asks for it at the end. It is the simplest form of the retrieval the SnapKV
paper tests with Needle-in-a-Haystack (arXiv 2404.14469, experiments): the question sits in the
observation window, so SnapKV should keep the key's positions at budgets far below the prompt length,
while a recency-only cache (StreamingLLM) finds the key only when it happens to be recent. H2O runs in
both its forms: `h2o` sums each key's attention over the prompt queries (our default), `h2o_mean`
averages it over the queries that see the key (kvpress's ObservedAttentionPress); the legend says which.

Cells: (method, budget, context length), `samples` prompts each, the same prompts for every method.
A budget at or above the context length would leave the prompt uncompressed (equal to the full cache by
construction, DESIGN invariant 3), so such cells are not run. A sample is correct when the output
contains the key.
"""

from __future__ import annotations

from experiments import methods, plots
from experiments.evaluate import accuracy_cell
from experiments.harness import Context, Scale
from experiments.prompts import Builder, Prompt, number, rng_for

NAME = "passkey"
SCALES = {
    "small": Scale(methods=("full", "snapkv", "streamingllm"), budgets=(64,), lengths=(256,), samples=4,
                   max_new_tokens=8, batch=4),
    "full": Scale(methods=methods.NAMES + ("h2o_mean",), budgets=(128, 256, 512, 1024, 2048), lengths=(2048, 4096, 8192),
                  samples=50, max_new_tokens=10, batch=50, dtype="bfloat16"),
}

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.\n")
QUESTION = "\nWhat is the pass key?"
ANSWER_PREFIX = "The pass key is"


def prompt(builder: Builder, seed: int, length: int, max_new_tokens: int, index: int) -> Prompt:
    """Sample `index` at context `length`: the key at a uniform random depth; prompt + answer fit `length`."""
    rng = rng_for(seed, NAME, length, index)
    key, depth = number(rng, 5), float(rng.random())
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    ids = builder.compose(rng, length - max_new_tokens, before=INTRO, needles=[(depth, needle)],
                          after=QUESTION, answer_prefix=ANSWER_PREFIX, kind="noise")
    return Prompt(tuple(ids), (key,), {"depth": round(depth, 4), "tokens": len(ids)})


def run(ctx: Context) -> dict:
    s = ctx.scale
    builder = Builder(ctx.tokenizer)
    names = methods.available(s.methods)
    cells = []
    for n in s.lengths:
        prompts = [prompt(builder, ctx.seed, n, s.max_new_tokens, i) for i in range(s.samples)]
        cells += [accuracy_cell(ctx, f"{methods.label(m, c)}_L{n}", prompts, m, c, length=n)
                  for m, c in methods.configs(names, s.budgets, length=n)]
    results = list(ctx.run(cells).values())
    plot(ctx, names, results)
    return {"methods": list(names), "cells": results}


def plot(ctx: Context, names, results: list[dict]) -> None:
    s = ctx.scale
    fig, axes = plots.grid(len(s.lengths))
    for ax, n in zip(axes, s.lengths):
        here = [r for r in results if r["length"] == n]
        for name in names:
            mine = sorted((r for r in here if r["method"] == name), key=lambda r: r["budget"] or 0)
            if not mine:
                continue
            if name == "full":
                plots.accuracy_band(ax, mine[0], "full cache")
            else:
                plots.accuracy_line(ax, [r["budget"] for r in mine], mine, methods.display(name))
        ax.set(xscale="log", xlabel="KV budget C (slots per layer and KV head)", ylabel="accuracy",
               ylim=(-0.03, 1.03), title=f"pass key, {n} tokens (n={s.samples} per point)")
        ax.minorticks_off()
        ax.set_xticks(list(s.budgets), [str(b) for b in s.budgets])
        ax.legend(fontsize=7)
    ctx.save_figure(fig, "passkey_accuracy")
