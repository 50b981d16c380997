"""pooling: the SnapKV paper's pooling ablation (arXiv 2404.14469; pooling is its section 4.2): SnapKV
with no pooling / average pooling / max pooling of the observation-window scores, kernel 1-13,
observation window 8-64, on single-needle retrieval at a tight KV budget.

The paper's claim: selecting single top-scoring positions keeps fragments of the answer (part of a
number); pooling the scores along positions keeps each hit with its neighbours, and retrieval accuracy
rises with it. The paper measures it on LongEval-Lines; the 135M model cannot retrieve lines even with
the full cache (1 of 4 at 256 tokens, measured on the CPU), so the task here is RULER's single NIAH
(arXiv 2404.06654: a seven-digit value for a word key in essay text, `ruler_tasks.niah_single`), whose
answer is also a run of tokens that must be kept together. Kernel 1 is no pooling whatever the mode, so
it is run once per window, as "none".

Cells: one per (budget, pooling, kernel, window, length), plus the full cache; the same prompts for all.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

import snapkv_jax as sk

from experiments import plots
from experiments.evaluate import accuracy_cell
from experiments.harness import Context, Scale, write_text
from experiments.prompts import Builder, rng_for
from experiments.ruler_tasks import niah_single

NAME = "pooling"
MODES = ("avgpool", "maxpool")


@dataclasses.dataclass(frozen=True)
class PoolingScale(Scale):
    kernels: tuple[int, ...] = (1, 3)     # odd; 1 = no pooling
    windows: tuple[int, ...] = (16,)      # observation windows

    AXES: ClassVar[tuple[str, ...]] = Scale.AXES + ("kernels", "windows")  # named in each cell's key


SCALES = {
    "small": PoolingScale(methods=(), budgets=(64,), lengths=(256,), samples=4, max_new_tokens=12, batch=4,
                          kernels=(1, 3), windows=(16,)),
    "full": PoolingScale(methods=(), budgets=(128,), lengths=(2048,), samples=50, max_new_tokens=12, batch=50,
                         dtype="bfloat16", kernels=(1, 3, 5, 7, 9, 11, 13), windows=(8, 16, 32, 64)),
}


def validate(scale: PoolingScale) -> None:
    if not scale.kernels or any(k < 1 or k % 2 == 0 for k in scale.kernels):
        raise ValueError(f"pooling kernels must be odd integers >= 1, got {scale.kernels}")
    if not scale.windows or any(w < 1 for w in scale.windows):
        raise ValueError(f"observation windows must be >= 1, got {scale.windows}")
    for c in scale.budgets:
        if c <= max(scale.windows):
            raise ValueError(f"budget {c} must exceed the largest observation window ({max(scale.windows)})")


def variants(s: PoolingScale) -> list[tuple[str, int, int]]:
    """(pooling, kernel, window) triples: "none" once per window, each mode at each kernel > 1."""
    out = [("none", 1, w) for w in s.windows]
    out += [(mode, k, w) for mode in MODES for k in s.kernels if k > 1 for w in s.windows]
    return out


def _key(pooling: str, kernel: int, window: int, budget: int, length: int) -> str:
    return f"{pooling}_k{kernel}_w{window}@{budget}_L{length}"


def run(ctx: Context) -> dict:
    s = ctx.scale
    builder = Builder(ctx.tokenizer)
    cells = []
    for n in s.lengths:
        prompts = [niah_single(builder, rng_for(ctx.seed, NAME, n, i), n - s.max_new_tokens)
                   for i in range(s.samples)]
        cells.append(accuracy_cell(ctx, f"full_L{n}", prompts, "full", None, length=n))
        for c in s.budgets:
            for pooling, kernel, window in variants(s):
                config = sk.SnapKV(capacity=c, window=window, kernel=kernel, pooling=pooling)
                cells.append(accuracy_cell(ctx, _key(pooling, kernel, window, c, n), prompts, "snapkv", c,
                                           config, pooling=pooling, kernel=kernel, window=window, length=n))
    results = list(ctx.run(cells).values())
    write_text(f"{ctx.out}/pooling_table.md", table(s, results))
    plot(ctx, results)
    return {"cells": results}


def table(s: PoolingScale, results: list[dict]) -> str:
    """Markdown: per (length, budget, mode), accuracy by kernel (columns) and window (rows)."""
    out = []
    for n in s.lengths:
        full = next(r for r in results if r["method"] == "full" and r["length"] == n)
        out += [f"### {n} tokens; full cache {full['acc']:.2f} [{full['lo']:.2f}, {full['hi']:.2f}]", ""]
        for c in s.budgets:
            for mode in MODES:
                out += [f"{mode}, C={c} (kernel 1 = no pooling), n={s.samples} per entry:", "",
                        "| window | " + " | ".join(f"k={k}" for k in s.kernels) + " |",
                        "|---" * (len(s.kernels) + 1) + "|"]
                for w in s.windows:
                    row = [_find(results, mode if k > 1 else "none", k, w, c, n) for k in s.kernels]
                    out.append(f"| {w} | " + " | ".join(f"{r['acc']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"
                                                         for r in row) + " |")
                out.append("")
    return "\n".join(out)


def _find(results, pooling, kernel, window, budget, length) -> dict:
    return next(r for r in results if r.get("pooling") == pooling and r["kernel"] == kernel
                and r["window"] == window and r["budget"] == budget and r["length"] == length)


def plot(ctx: Context, results: list[dict]) -> None:
    s = ctx.scale
    panels = [(n, c, mode) for n in s.lengths for c in s.budgets for mode in MODES]
    fig, axes = plots.grid(len(panels), cols=2)
    for ax, (n, c, mode) in zip(axes, panels):
        full = next(r for r in results if r["method"] == "full" and r["length"] == n)
        plots.accuracy_band(ax, full, "full cache")
        for w in s.windows:
            row = [_find(results, mode if k > 1 else "none", k, w, c, n) for k in s.kernels]
            plots.accuracy_line(ax, np.array(s.kernels), row, f"window {w}")
        ax.set(xlabel="pooling kernel (1 = none)", ylabel="accuracy", ylim=(-0.03, 1.03),
               title=f"SnapKV {mode}, C={c}, {n} tokens, n={s.samples}")
        ax.set_xticks(list(s.kernels))
        ax.legend(fontsize=7)
    ctx.save_figure(fig, "pooling_ablation")
