"""many_questions: one document, eight questions about different facts, answered three ways.

  per_question  every question appended to the document and the whole prompt prefilled (and, for SnapKV,
                compressed) again: SnapKV's own setting, the question inside the observation window, at the
                price of one prefill of the document per question;
  once          the document prefilled and compressed once, before any question is known, and the eight
                questions asked against that one shared cache (`generate(..., context=)`, held once in
                memory: "Compress once, ask many");
  full          the full cache, asked once per document the same way (the accuracy every method aims at).
Every method runs `once` (KVzip among them: query-agnostic by construction, arXiv 2505.23416); SnapKV also
runs `per_question`. Each cell records accuracy and the prefill cost: tokens prefilled, their model FLOPs
(2 x linear parameters x tokens + causal attention, the `extend` of each question counted against the
cache it reads; KVzip's reconstruction pass counted too, `bench_common.kvzip_reconstruction_flops`), the
seconds the cell took (compiles included), and wall seconds per document: `doc_seconds`, one entry per document (`once`: its prefill and its eight
answers; `per_question`: one `generate` call of `batch` prompts, one document's eight questions when
batch = FACTS), with `warm_doc_s` their median over every document but the first (which compiles), and
for `once` `prefill_seconds` / `warm_prefill_s` the same for the document's prefill alone.

Documents: essay text with eight key-value facts at random depths (RULER's multi-key NIAH, arXiv
2404.06654); question q asks for fact q's value, the answer prefix does not name the key.
Cells: (approach, method, budget, length), `samples` documents of eight questions each.
"""

from __future__ import annotations

import time

import jax
import numpy as np

import snapkv_jax as sk
from snapkv_jax.generate import bucket_width

from experiments import methods, plots, scoring
from experiments.bench_common import kvzip_reconstruction_flops
from experiments.evaluate import accuracy_cell, decode, record
from experiments.harness import Cell, Context, Scale, write_text
from experiments.prompts import Builder, Prompt, key_values, rng_for
from experiments.ruler_tasks import NIAH_INTRO

NAME = "many_questions"
FACTS = 8
ANSWER_PREFIX = "The special magic number is"

SCALES = {
    "small": Scale(methods=("full", "snapkv"), budgets=(64,), lengths=(320,), samples=1, max_new_tokens=10,
                   batch=8),
    "full": Scale(methods=methods.NAMES + ("kvzip",), budgets=(256, 512, 1024), lengths=(4096,), samples=10,
                  max_new_tokens=12, batch=8, dtype="bfloat16"),
}


def document(builder: Builder, seed: int, length: int, max_new_tokens: int, index: int) -> list[Prompt]:
    """The FACTS prompts of one document (`split` = the shared document's end), each at most
    length - max_new_tokens tokens."""
    rng = rng_for(seed, NAME, length, index)
    facts = key_values(rng, FACTS)
    asks = [builder.ids(f"\nWhat is the special magic number for {key} mentioned in the provided text?")
            for key, _ in facts]
    intro = builder.ids(NIAH_INTRO)
    room = length - max_new_tokens - builder.frame_cost(ANSWER_PREFIX) - len(intro) - max(map(len, asks))
    needles = [(float(rng.random()), f"One of the special magic numbers for {k} is: {v}.") for k, v in facts]
    doc = builder.document(rng, room, needles)
    split = len(builder.frame([])) + len(intro) + len(doc)
    framed = [tuple(builder.frame([*intro, *doc, *ask], ANSWER_PREFIX)) for ask in asks]
    return [Prompt(ids, (value,), {"key": key, "question": q, "tokens": len(ids)}, split)
            for q, ((key, value), ids) in enumerate(zip(facts, framed))]


def prefill_flops(cfg, tokens: int, attended: int = 0) -> float:
    """Model FLOPs of prefilling `tokens` that attend causally to each other and to `attended` cached
    slots: matmuls 2 x linear params x tokens, attention 4 x (causal pairs + tokens x attended) x H x D."""
    linear = cfg.num_layers * (cfg.hidden_size * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
                               + cfg.num_heads * cfg.head_dim * cfg.hidden_size
                               + 3 * cfg.hidden_size * cfg.intermediate_size)
    pairs = tokens * (tokens + 1) / 2 + tokens * attended
    return 2.0 * linear * tokens + 4.0 * cfg.num_layers * pairs * cfg.num_heads * cfg.head_dim


def timings(seconds: list[float], name: str) -> dict:
    """`<name>_seconds` (rounded) and `warm_<name>_s`, their median without the first (compiling) entry."""
    return {f"{name}_seconds": [round(float(x), 4) for x in seconds],
            f"warm_{name}_s": float(np.median(seconds[1:])) if len(seconds) > 1 else None}


def once_cell(ctx: Context, key: str, docs: list[list[Prompt]], method_name: str, budget, **fields) -> Cell:
    """Each document prefilled (and compressed) once; its questions generated against it as one shared
    context. Scores and costs as the module docstring says."""

    def compute(advance):
        method = methods.build(method_name, budget, seed=ctx.seed, tokenizer=ctx.tokenizer)
        texts, prompts, tokens, flops, doc_s, prefill_s = [], [], 0, 0.0, [], []
        for questions in docs:
            split = questions[0].split
            # Right-padded to its bucket, as generate pads prompts: documents of one cell then share one
            # prefill program and one context shape (unpadded, each document compiled both anew).
            doc = np.zeros((1, bucket_width(split)), np.int32)                    # [1, W]
            doc[0, :split] = questions[0].ids[:split]
            start = time.perf_counter()
            _, shared = jax.block_until_ready(sk.prefill(ctx.params, ctx.cfg, doc, [split], compress=method))
            prefill_s.append(time.perf_counter() - start)
            tails = [p.ids[split:] for p in questions]
            ids = np.zeros((len(tails), max(map(len, tails))), np.int32)
            for i, t in enumerate(tails):
                ids[i, :len(t)] = t
            out = sk.generate(ctx.params, ctx.cfg, ids, [len(t) for t in tails], context=shared,
                              max_new_tokens=ctx.scale.max_new_tokens, eos_id=ctx.tokenizer.eos_token_id)
            toks, n = np.asarray(out.tokens), np.asarray(out.lengths)
            doc_s.append(time.perf_counter() - start)
            texts += [decode(ctx.tokenizer, toks[i, :n[i]].tolist()) for i in range(len(tails))]
            prompts += questions
            held = int(np.asarray(sk.cache.valid_slots(shared)).max())
            tokens += split + sum(map(len, tails))
            flops += prefill_flops(ctx.cfg, split) + sum(prefill_flops(ctx.cfg, len(t), held) for t in tails)
            if isinstance(method, sk.KVzip):  # its reconstruction pass runs over the padded document
                flops += sum(kvzip_reconstruction_flops(ctx.cfg, doc.shape[1], method))
            advance(len(questions))
        scores = [scoring.found(t, p.answers) for t, p in zip(texts, prompts)]
        return ({"method": method_name, "budget": budget, **fields, "prefill_tokens": tokens,
                 "prefill_flops": flops} | timings(doc_s, "doc") | timings(prefill_s, "prefill") | scoring.cell(scores)
                | {"samples": [record(p, t, s) for p, t, s in zip(prompts, texts, scores)]})

    return Cell(key=key, size=sum(map(len, docs)), compute=compute)


def per_question_cell(ctx: Context, key: str, docs: list[list[Prompt]], method_name: str, budget, **fields) -> Cell:
    """Every question's whole prompt prefilled by itself (accuracy_cell), with its prefill cost."""
    prompts = [Prompt(p.ids, p.answers, p.meta) for questions in docs for p in questions]  # no split
    cell = accuracy_cell(ctx, key, prompts, method_name, budget, approach="per_question", **fields)
    tokens = sum(len(p.ids) for p in prompts)

    def compute(advance):
        marks = [time.perf_counter()]

        def timed(n):  # called after each batch's outputs reached the host
            marks.append(time.perf_counter())
            advance(n)

        return cell.compute(timed) | {"prefill_tokens": tokens,
                                      "prefill_flops": sum(prefill_flops(ctx.cfg, len(p.ids)) for p in prompts)
                                      } | timings(list(np.diff(marks)), "doc")

    return Cell(key=key, size=cell.size, compute=compute)


def run(ctx: Context) -> dict:
    s = ctx.scale
    builder = Builder(ctx.tokenizer)
    names = methods.available(s.methods)
    cells = []
    for n in s.lengths:
        docs = [document(builder, ctx.seed, n, s.max_new_tokens, i) for i in range(s.samples)]
        for m, c in methods.configs(names, s.budgets, length=n):
            cells.append(once_cell(ctx, f"once_{methods.label(m, c)}_L{n}", docs, m, c, approach="once", length=n))
        if "snapkv" in names:
            cells += [per_question_cell(ctx, f"per_question_{methods.label('snapkv', c)}_L{n}", docs, "snapkv", c,
                                        length=n) for c in s.budgets if c < n]
    results = list(ctx.run(cells).values())
    for r in results:  # question q asks for fact q (its depth is random per document)
        r["by_question"] = [scoring.cell([x["score"] for x in r["samples"] if x["question"] == q])
                            for q in range(FACTS)]
    write_text(f"{ctx.out}/many_questions_table.md", table(s, results))
    plot(ctx, results)
    return {"methods": list(names), "facts": FACTS, "cells": results}


def table(s: Scale, results: list[dict]) -> str:
    """Markdown: one row per cell; seconds per document warm (median over documents 2..N), the document's
    prefill alone for `once`, and the cell's total (compiles included)."""
    def sec(x):
        return "-" if x is None else f"{x:.3f}"

    lines = ["| approach | method | budget | length | accuracy [95% Wilson] | prefill tokens | prefill TFLOPs | "
             "s / document (warm) | prefill s / document (warm) | cell s |", "|---" * 10 + "|"]
    for r in sorted(results, key=lambda r: (r["length"], r["approach"], r["method"], r["budget"] or 0)):
        lines.append(f"| {r['approach']} | {methods.display(r['method'])} | {r['budget'] or '-'} | {r['length']} | "
                     f"{r['acc']:.2f} ({r['correct']}/{r['n']}) [{r['lo']:.2f}, {r['hi']:.2f}] | "
                     f"{r['prefill_tokens']} | {r['prefill_flops'] / 1e12:.3f} | {sec(r.get('warm_doc_s'))} | "
                     f"{sec(r.get('warm_prefill_s'))} | {r['seconds']:.1f} |")
    lines += ["", f"Accuracy per question (question q asks for fact q; n = {s.samples} documents per entry):", "",
              "| approach | method | budget | length | " + " | ".join(f"q{q + 1}" for q in range(FACTS)) + " |",
              "|---" * (FACTS + 4) + "|"]
    for r in sorted(results, key=lambda r: (r["length"], r["approach"], r["method"], r["budget"] or 0)):
        lines.append(f"| {r['approach']} | {methods.display(r['method'])} | {r['budget'] or '-'} | {r['length']} | "
                     + " | ".join(f"{c['acc']:.2f}" for c in r["by_question"]) + " |")
    return "\n".join(lines) + "\n"


def plot(ctx: Context, results: list[dict]) -> None:
    s = ctx.scale
    fig, axes = plots.grid(len(s.lengths), cols=1, size=(max(6.0, 0.9 * len(results)), 3.6))
    for ax, n in zip(axes, s.lengths):
        here = sorted((r for r in results if r["length"] == n), key=lambda r: (r["approach"], r["method"]))
        labels = [f"{r['approach']}\n{methods.display(r['method'])}" + (f"\nC={r['budget']}" if r["budget"] else "")
                  for r in here]
        plots.accuracy_bars(ax, np.arange(len(here)), here, 0.7, "accuracy")
        ax.set_xticks(np.arange(len(here)), labels, fontsize=7)
        ax.set(ylim=(-0.03, 1.03), ylabel="accuracy",
               title=f"{FACTS} questions per document, {n} tokens (n={s.samples * FACTS} per bar)")
    ctx.save_figure(fig, "many_questions_accuracy")
