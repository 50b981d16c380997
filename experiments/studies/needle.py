"""needle: Needle-in-a-Haystack heatmaps, needle depth 0-100% x context length 1K-8K, for the full cache
and each method at C = 256 / 512 / 1024.

Reproduces the SnapKV paper's Needle-in-a-Haystack test (arXiv 2404.14469, its experiments on
LWM-Text-Chat-1M: SnapKV at C=1024 retrieves the needle with a negligible accuracy drop up to 380K
tokens) at the scale of our 8K-position model. Needle and question are RULER's single-NIAH form (a 7-digit "special
magic number" for a word key in essay-like text, `ruler_tasks.niah_single`), so answers are scored
exactly, without a judge model. H2O runs in both its forms, each heatmap titled with its own:
`h2o (summed)` (the attention summed over the prompt queries, our default) and `h2o (averaged)`
(`h2o_mean`: averaged over the queries that see the key, kvpress's ObservedAttentionPress).

Cells: (method, budget, length), `samples` prompts each, sample i at depth `depths[i % len(depths)]`;
the same prompts for every method. The accuracy cell is the (method, budget, length) one (>= 50 samples
at --scale full); each heatmap square, one depth of it, holds samples / len(depths) of them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments import methods, plots, scoring
from experiments.evaluate import accuracy_cell
from experiments.harness import Context, Scale
from experiments.prompts import Builder, Prompt, rng_for
from experiments.ruler_tasks import niah_single

NAME = "needle"


@dataclasses.dataclass(frozen=True)
class NeedleScale(Scale):
    depths: tuple[float, ...] = (0.0, 0.5, 1.0)


SCALES = {
    "small": NeedleScale(methods=("full", "snapkv"), budgets=(64,), lengths=(256,), samples=4,
                         max_new_tokens=12, batch=4, depths=(0.0, 0.5, 1.0)),
    "full": NeedleScale(methods=methods.NAMES + ("h2o_mean",), budgets=(256, 512, 1024), lengths=(1024, 2048, 4096, 8192),
                        samples=50, max_new_tokens=12, batch=50, dtype="bfloat16",
                        depths=tuple(round(i / 9, 3) for i in range(10))),
}


def validate(scale: NeedleScale) -> None:
    if not scale.depths or any(not 0.0 <= d <= 1.0 for d in scale.depths):
        raise ValueError(f"needle depths must be in [0, 1], got {scale.depths}")


def prompts_at(builder: Builder, seed: int, scale: NeedleScale, length: int) -> list[Prompt]:
    """`samples` prompts at context `length` (prompt + answer fit in it), depths taken in turn."""
    out = []
    for i in range(scale.samples):
        depth = scale.depths[i % len(scale.depths)]
        p = niah_single(builder, rng_for(seed, NAME, length, i), length - scale.max_new_tokens, depth)
        out.append(dataclasses.replace(p, meta=p.meta | {"depth": depth}))
    return out


def run(ctx: Context) -> dict:
    s = ctx.scale
    builder = Builder(ctx.tokenizer)
    names = methods.available(s.methods)
    cells = []
    for n in s.lengths:
        prompts = prompts_at(builder, ctx.seed, s, n)
        cells += [accuracy_cell(ctx, f"{methods.label(m, c)}_L{n}", prompts, m, c, length=n)
                  for m, c in methods.configs(names, s.budgets, length=n)]
    results = list(ctx.run(cells).values())
    for r in results:
        r["by_depth"] = {str(d): scoring.cell([x["score"] for x in r["samples"] if x["depth"] == d])
                         for d in s.depths}
    plot(ctx, names, results)
    return {"methods": list(names), "cells": results}


def plot(ctx: Context, names, results: list[dict]) -> None:
    s = ctx.scale
    configs = methods.configs(names, s.budgets)
    fig, axes = plots.grid(len(configs), cols=4, size=(3.6, 3.4))
    for ax, (m, c) in zip(axes, configs):
        acc = np.full((len(s.depths), len(s.lengths)), np.nan)                   # [depths, lengths]
        for r in results:
            if r["method"] == m and r["budget"] == c:
                col = s.lengths.index(r["length"])
                for row, d in enumerate(s.depths):
                    value = r["by_depth"][str(d)]["acc"]
                    acc[row, col] = np.nan if value is None else value
        mean = f"{np.nanmean(acc):.2f}" if np.isfinite(acc).any() else "n/a"
        im = plots.heatmap(ax, acc, [f"{d:.0%}" for d in s.depths], s.lengths,
                           f"{methods.label(methods.display(m), c)}: mean {mean}")
        ax.set(xlabel="context length (tokens)", ylabel="needle depth")
    fig.colorbar(im, ax=axes, shrink=0.6, label="accuracy per square")
    ctx.save_figure(fig, "needle_heatmaps")
