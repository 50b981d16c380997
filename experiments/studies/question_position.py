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
The gap between `after` and `agnostic` is what question-agnostic compression must close. Two
query-agnostic answers are compared in the `before` and `agnostic` columns:
  kvzip           KVzip (arXiv 2505.23416): keys scored by the attention they get while the model
                  reconstructs the prefilled text after "Repeat the previous context exactly." (a regular
                  method: it runs in every column, and in `after` the question is part of what it
                  reconstructs);
  snapkv_generic  SnapKV whose observation window is exactly a generic, question-free instruction: the
                  prefilled and compressed part ends with GENERIC ("Remember the text above: a question
                  about it follows."), the window is its w = len(GENERIC) tokens (12 with SmolLM2's
                  tokenizer; pooling and capacity as `snapkv`), and what follows it (`agnostic`: the
                  question and the answer prefix; `before`: the answer prefix) is fed into the compressed
                  cache afterwards. In `agnostic` its prompts are the `agnostic` prompts themselves (plain
                  `snapkv` there has its 32-token window over GENERIC and the document's end); in `before`
                  they are the `before` prompts with GENERIC inserted before the answer prefix. It has no
                  `after` column (the question would be in its window).
Documents: essay text with four key-value facts at random depths, a question about one of them (RULER's
multi-key NIAH, arXiv 2404.06654); the answer prefix does not name the key, so every variant ends the
same way.

Cells: (variant, method, budget, length), `samples` prompts each, the same documents for all.
"""

from __future__ import annotations

import numpy as np

import snapkv_jax as sk

from experiments import methods, plots
from experiments.evaluate import accuracy_cell
from experiments.harness import Context, Scale, write_text
from experiments.prompts import Builder, Prompt, key_values, rng_for
from experiments.ruler_tasks import NIAH_INTRO

NAME = "question_position"
VARIANTS = ("after", "before", "agnostic")
GENERIC = "\nRemember the text above: a question about it follows."
ANSWER_PREFIX = "The special magic number is"
KEYS = 4
GENERIC_METHOD = "snapkv_generic"
GENERIC_VARIANTS = ("before", "agnostic")  # snapkv_generic's columns; it runs wherever "snapkv" does

SCALES = {
    # Small: snapkv_generic's cells run (its own prompt path); kvzip's would add ~35 s of CPU compiles to
    # `make test` and go through the same generate path as every method (tests/test_kvzip.py covers it).
    "small": Scale(methods=("full", "snapkv"), budgets=(64,), lengths=(256,), samples=4, max_new_tokens=12,
                   batch=4),
    "full": Scale(methods=methods.NAMES + ("kvzip",), budgets=(1024,), lengths=(4096,), samples=50,
                  max_new_tokens=12, batch=50, dtype="bfloat16"),
}


def prompts_for(builder: Builder, seed: int, length: int, max_new_tokens: int, index: int) -> dict[str, Prompt]:
    """One document asked the three ways (variant -> Prompt), each at most length - max_new_tokens tokens,
    and the snapkv_generic prompts ("generic_before", "generic_agnostic": compressed up to GENERIC's end)."""
    rng = rng_for(seed, NAME, length, index)
    facts = key_values(rng, KEYS)
    key, value = facts[int(rng.integers(KEYS))]
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    intro, ask, generic = builder.ids(NIAH_INTRO), builder.ids("\n" + question), builder.ids(GENERIC)
    room = length - max_new_tokens - builder.frame_cost(ANSWER_PREFIX) - len(intro) - len(ask) - len(generic)
    needles = [(float(rng.random()), f"One of the special magic numbers for {k} is: {v}.") for k, v in facts]
    doc = builder.document(rng, room, needles)
    head = len(builder.frame([]))  # tokens before the content (the tokenizer's own leading specials)
    asked_first = builder.ids(question + "\n")
    made = {
        "after": (builder.frame([*intro, *doc, *ask], ANSWER_PREFIX), None),
        "before": (builder.frame([*intro, *asked_first, *doc], ANSWER_PREFIX), None),
        "agnostic": (builder.frame([*intro, *doc, *generic, *ask], ANSWER_PREFIX),
                     head + len(intro) + len(doc) + len(generic)),
        "generic_before": (builder.frame([*intro, *asked_first, *doc, *generic], ANSWER_PREFIX),
                           head + len(intro) + len(asked_first) + len(doc) + len(generic)),
    }
    made["generic_agnostic"] = made["agnostic"]
    return {v: Prompt(tuple(ids), (value,), {"key": key, "tokens": len(ids), "variant": v.split("_")[-1]}, split)
            for v, (ids, split) in made.items()}


def generic_window(builder: Builder, capacity: int):
    """snapkv_generic at `capacity`: SnapKV whose window is GENERIC's tokens (the module docstring)."""
    return sk.SnapKV(capacity=capacity, window=len(builder.ids(GENERIC)))


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
        if "snapkv" in names:
            for variant in GENERIC_VARIANTS:
                prompts = [d[f"generic_{variant}"] for d in docs]
                cells += [accuracy_cell(ctx, f"{variant}_{methods.label(GENERIC_METHOD, c)}_L{n}", prompts,
                                        GENERIC_METHOD, c, config=generic_window(builder, c), variant=variant,
                                        length=n) for c in s.budgets if c < n]
    results = list(ctx.run(cells).values())
    rows = list(names) + ([GENERIC_METHOD] if any(r["method"] == GENERIC_METHOD for r in results) else [])
    write_text(f"{ctx.out}/question_position_table.md", table(s, rows, results))
    plot(ctx, rows, results)
    return {"methods": rows, "variants": list(VARIANTS), "cells": results}


def _configs(names, budgets, length):
    """(method, budget) rows: the table's methods, then snapkv_generic at each budget if it ran."""
    table_names = [m for m in names if m != GENERIC_METHOD]
    out = methods.configs(table_names, budgets, length=length)
    if GENERIC_METHOD in names:
        out += [(GENERIC_METHOD, c) for c in budgets if c < length]
    return out


def table(s: Scale, names, results: list[dict]) -> str:
    """Markdown: one row per method and budget, one column per variant, and `agnostic` as a share of
    `after` (how much of its question-aware accuracy a method keeps without the question; for
    snapkv_generic, of plain snapkv's `after` at the same budget, marked *)."""
    out = []
    for n in s.lengths:
        out += [f"### {n} tokens, n={s.samples} per entry", "",
                "| method | " + " | ".join(VARIANTS) + " | agnostic / after |", "|---" * (len(VARIANTS) + 2) + "|"]
        for m, c in _configs(names, s.budgets, n):
            def cells_of(name):
                return {r["variant"]: r for r in results
                        if r["method"] == name and r["budget"] == c and r["length"] == n}
            row = cells_of(m)
            after = (cells_of("snapkv") if m == GENERIC_METHOD else row).get("after")
            kept = row["agnostic"]["acc"] / after["acc"] if after and after["acc"] else float("nan")
            star = "*" if m == GENERIC_METHOD else ""
            out.append(f"| {methods.label(m, c)} | " + " | ".join(
                f"{row[v]['acc']:.2f} [{row[v]['lo']:.2f}, {row[v]['hi']:.2f}]" if v in row else "n/a"
                for v in VARIANTS) + f" | {kept:.2f}{star} |")
        out.append("")
    return "\n".join(out)


def plot(ctx: Context, names, results: list[dict]) -> None:
    s = ctx.scale
    fig, axes = plots.grid(len(s.lengths), cols=1, size=(max(6.0, 1.6 * len(names) * len(s.budgets)), 3.6))
    for ax, n in zip(axes, s.lengths):
        configs = _configs(names, s.budgets, n)
        width = 0.8 / len(VARIANTS)
        for j, v in enumerate(VARIANTS):
            found = [(i, next((r for r in results if r["variant"] == v and r["method"] == m and r["budget"] == c
                               and r["length"] == n), None)) for i, (m, c) in enumerate(configs)]
            found = [(i, r) for i, r in found if r is not None]  # snapkv_generic has no `after`
            x = np.array([i for i, _ in found]) + (j - (len(VARIANTS) - 1) / 2) * width
            plots.accuracy_bars(ax, x, [r for _, r in found], width, f"question {v}")
        ax.set_xticks(range(len(configs)), [methods.label(m, c) for m, c in configs], rotation=15)
        ax.set(ylabel="accuracy", ylim=(0, 1.05),
               title=f"question position, {n} tokens (n={s.samples} per bar, 95% Wilson)")
        ax.legend(fontsize=7)
    ctx.save_figure(fig, "question_position")
