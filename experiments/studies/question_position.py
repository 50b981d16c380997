"""question_position: how much of its accuracy each method keeps when the compressor cannot see the
question.

SnapKV chooses what to keep from the attention of the prompt's last tokens (arXiv 2404.14469, section
3: the observation window "knows what you are looking for" because the question is there, and different
questions about one document attend to different positions). The same documents are asked three ways:
  after     document, then the question: SnapKV's case, the question inside the observation window;
  before    the question, then the document: the window sees only the document's end;
  agnostic  the document and a generic suffix are prefilled and compressed, the question is fed only
            afterwards into the compressed cache (`Prompt.split`): question-agnostic compression, as a
            cache reused for several questions needs.
The gap between `after` and `agnostic` is what question-agnostic compression (a later capability) must
close. Documents: essay text with four key-value facts at random depths, a question about one of them
(RULER's multi-key NIAH, arXiv 2404.06654); the answer prefix does not name the key, so every variant
ends the same way.

Cells: (variant, method, budget, length), `samples` prompts each, the same documents for all.
"""

from __future__ import annotations

import numpy as np

from experiments import methods, plots
from experiments.evaluate import accuracy_cell
from experiments.harness import Context, Scale, write_text
from experiments.prompts import Builder, Prompt, needle_key, number, rng_for
from experiments.ruler_tasks import NIAH_INTRO

NAME = "question_position"
VARIANTS = ("after", "before", "agnostic")
GENERIC = "\nRemember the text above: a question about it follows."
ANSWER_PREFIX = "The special magic number is"
KEYS = 4

SCALES = {
    "small": Scale(methods=("full", "snapkv"), budgets=(64,), lengths=(256,), samples=4, max_new_tokens=12,
                   batch=4),
    "full": Scale(methods=methods.NAMES, budgets=(1024,), lengths=(4096,), samples=50, max_new_tokens=12,
                  batch=50, dtype="bfloat16"),
}


def prompts_for(builder: Builder, seed: int, length: int, max_new_tokens: int, index: int) -> dict[str, Prompt]:
    """One document asked the three ways (variant -> Prompt), each at most length - max_new_tokens tokens."""
    rng = rng_for(seed, NAME, length, index)
    taken: set[str] = set()
    facts = []
    for _ in range(KEYS):
        key = needle_key(rng, taken)
        taken.add(key)
        facts.append((key, number(rng, 7)))
    key, value = facts[int(rng.integers(KEYS))]
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    intro, ask, generic = builder.ids(NIAH_INTRO), builder.ids("\n" + question), builder.ids(GENERIC)
    room = length - max_new_tokens - builder.frame_cost(ANSWER_PREFIX) - len(intro) - len(ask) - len(generic)
    needles = [(float(rng.random()), f"One of the special magic numbers for {k} is: {v}.") for k, v in facts]
    doc = builder.document(rng, room, needles)
    head = len(builder.frame([]))  # tokens before the content (the tokenizer's own leading specials)
    made = {
        "after": (builder.frame([*intro, *doc, *ask], ANSWER_PREFIX), None),
        "before": (builder.frame([*intro, *builder.ids(question + "\n"), *doc], ANSWER_PREFIX), None),
        "agnostic": (builder.frame([*intro, *doc, *generic, *ask], ANSWER_PREFIX),
                     head + len(intro) + len(doc) + len(generic)),
    }
    return {v: Prompt(tuple(ids), (value,), {"key": key, "tokens": len(ids), "variant": v}, split)
            for v, (ids, split) in made.items()}


def run(ctx: Context) -> dict:
    s = ctx.scale
    builder = Builder(ctx.tokenizer)
    names = methods.available(s.methods)
    cells = []
    for n in s.lengths:
        docs = [prompts_for(builder, ctx.seed, n, s.max_new_tokens, i) for i in range(s.samples)]
        for variant in VARIANTS:
            prompts = [d[variant] for d in docs]
            cells += [accuracy_cell(ctx, f"{variant}_{methods.label(m, c)}_L{n}", prompts, m, c, variant=variant,
                                    length=n) for m, c in methods.configs(names, s.budgets, length=n)]
    results = list(ctx.run(cells).values())
    write_text(f"{ctx.out}/question_position_table.md", table(s, names, results))
    plot(ctx, names, results)
    return {"methods": list(names), "variants": list(VARIANTS), "cells": results}


def table(s: Scale, names, results: list[dict]) -> str:
    """Markdown: one row per method and budget, one column per variant, and `agnostic` as a share of
    `after` (how much of its question-aware accuracy a method keeps without the question)."""
    out = []
    for n in s.lengths:
        out += [f"### {n} tokens, n={s.samples} per entry", "",
                "| method | " + " | ".join(VARIANTS) + " | agnostic / after |", "|---" * (len(VARIANTS) + 2) + "|"]
        for m, c in methods.configs(names, s.budgets, length=n):
            row = {r["variant"]: r for r in results
                   if r["method"] == m and r["budget"] == c and r["length"] == n}
            kept = row["agnostic"]["acc"] / row["after"]["acc"] if row["after"]["acc"] else float("nan")
            out.append(f"| {methods.label(m, c)} | " + " | ".join(
                f"{row[v]['acc']:.2f} [{row[v]['lo']:.2f}, {row[v]['hi']:.2f}]" for v in VARIANTS) + f" | {kept:.2f} |")
        out.append("")
    return "\n".join(out)


def plot(ctx: Context, names, results: list[dict]) -> None:
    s = ctx.scale
    fig, axes = plots.grid(len(s.lengths), cols=1, size=(max(6.0, 1.6 * len(names) * len(s.budgets)), 3.6))
    for ax, n in zip(axes, s.lengths):
        configs = methods.configs(names, s.budgets, length=n)
        width = 0.8 / len(VARIANTS)
        for j, v in enumerate(VARIANTS):
            cells = [next(r for r in results if r["variant"] == v and r["method"] == m and r["budget"] == c
                          and r["length"] == n) for m, c in configs]
            x = np.arange(len(configs)) + (j - (len(VARIANTS) - 1) / 2) * width
            plots.accuracy_bars(ax, x, cells, width, f"question {v}")
        ax.set_xticks(range(len(configs)), [methods.label(m, c) for m, c in configs], rotation=15)
        ax.set(ylabel="accuracy", ylim=(0, 1.05),
               title=f"question position, {n} tokens (n={s.samples} per bar, 95% Wilson)")
        ax.legend(fontsize=7)
    ctx.save_figure(fig, "question_position")
