"""observation: the SnapKV paper's section 3 finding (arXiv 2404.14469, "Observations"): the
prompt positions each attention head attends to while generating can be found before generation, from
the attention of an observation window at the end of the prompt.

Per layer, the hit rate: of the C - w prefix positions that generation-time attention (accumulated over
`max_new_tokens` >= 16 generated tokens, full cache) ranks highest, the share that the observation
window's attention ranks highest too (`attention.hit_rates`; no pooling, as in section 3, before the
paper adds it). Repeated with the window taken `offsets` tokens before the prompt's end, which shows
how stable that choice is: the paper finds the last window predicts generation best. Random choice would
hit (C - w) / (L - w) on average, the dashed line of the plot. Prompts are QA-style: a document of
essay text holding four key-value facts and a question about one of them (RULER's multi-key NIAH).

One cell per context length: greedy generation of `max_new_tokens` tokens (no EOS stop, so every row
has the same count), then one probe pass over prompt + generated tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from experiments import attention, batching, plots
from experiments.harness import Cell, Context, Scale
from experiments.prompts import Builder, rng_for
from experiments.ruler_tasks import niah_multikey

NAME = "observation"


@dataclasses.dataclass(frozen=True)
class ObservationScale(Scale):
    window: int = 16
    offsets: tuple[int, ...] = (0, 16, 64)   # window end, tokens before the prompt's end


SCALES = {
    "small": ObservationScale(methods=(), budgets=(64,), lengths=(256,), samples=4, max_new_tokens=16,
                              batch=4, window=16, offsets=(0, 16, 64)),
    "full": ObservationScale(methods=(), budgets=(1024,), lengths=(4096,), samples=50, max_new_tokens=32,
                             batch=50, dtype="bfloat16", window=32, offsets=(0, 32, 128, 512, 1024, 2048)),
}


def validate(scale: ObservationScale) -> None:
    if scale.max_new_tokens < 16:
        raise ValueError(f"observation accumulates generation-time attention over >= 16 tokens; "
                         f"got max_new_tokens={scale.max_new_tokens}")
    if len(scale.budgets) != 1 or scale.budgets[0] <= scale.window:
        raise ValueError(f"observation takes one budget C > window={scale.window}, got {scale.budgets}")
    if not scale.offsets or min(scale.offsets) < 0:
        raise ValueError(f"window offsets must be >= 0, got {scale.offsets}")
    for n in scale.lengths:
        prompt = n - scale.max_new_tokens - 16  # prompts fill their target to within one sentence
        if max(scale.offsets) + scale.window >= prompt:
            raise ValueError(f"offsets {scale.offsets} + window {scale.window} reach past the start of a "
                             f"{prompt}-token prompt")
        if scale.budgets[0] > prompt:
            raise ValueError(f"budget {scale.budgets[0]} exceeds the {prompt}-token prompt")


def run(ctx: Context) -> dict:
    s = ctx.scale
    builder = Builder(ctx.tokenizer)
    cells = [_cell(ctx, builder, n) for n in s.lengths]
    results = list(ctx.run(cells).values())
    plot(ctx, results)
    return {"cells": results}


def _cell(ctx: Context, builder: Builder, length: int) -> Cell:
    s = ctx.scale
    prompts = [niah_multikey(builder, rng_for(ctx.seed, NAME, length, i), length - s.max_new_tokens).ids
               for i in range(s.samples)]
    top = s.budgets[0] - s.window

    def compute(advance):
        gen = batching.generate(ctx.cfg, ctx.params, prompts, None, max_new_tokens=s.max_new_tokens,
                                rows=s.batch, eos_id=None)
        full = [list(p) + g for p, g in zip(prompts, gen)]
        rates = np.zeros((len(prompts), ctx.cfg.num_layers, ctx.cfg.num_heads, len(s.offsets)))  # [N, L, H, O]
        for chunk, tokens, lengths in batching.batches(full, s.batch):
            prompt_lengths = lengths - s.max_new_tokens                          # [B]
            for layer, (q, k) in enumerate(attention.layers_qk(ctx.params, ctx.cfg, tokens)):
                r = attention.hit_rates(q, k, prompt_lengths, window=s.window, offsets=tuple(s.offsets),
                                        generated=s.max_new_tokens, top=top)
                rates[chunk, layer] = jax.device_get(r)[:len(chunk)]
            advance(len(chunk))
        per_layer = rates.mean(axis=2)                                           # [N, L, O]
        chance = float(np.mean([top / (len(p) - s.window) for p in prompts]))
        return {"length": length, "top": top, "window": s.window, "offsets": list(s.offsets),
                "generated": s.max_new_tokens, "n": len(prompts), "chance": chance,
                "hit_rate": per_layer.mean(0).tolist(),                           # [L, O]
                "hit_rate_sem": (per_layer.std(0, ddof=1) / np.sqrt(len(prompts))).tolist()
                if len(prompts) > 1 else None,
                "hit_rate_per_head": rates.mean(0).tolist()}                      # [L, H, O]

    return Cell(key=f"hits_L{length}", size=len(prompts), compute=compute)


def plot(ctx: Context, results: list[dict]) -> None:
    fig, axes = plots.grid(2 * len(results), cols=2, size=(5.4, 3.8))
    for i, r in enumerate(results):
        hits = np.array(r["hit_rate"])                                           # [L, O]
        layers = hits.shape[0]
        ax = axes[2 * i]
        x = np.arange(len(r["offsets"]))
        for layer in range(layers):
            ax.plot(x, hits[layer], color=plots.layer_color(layer, layers), linewidth=1)
        ax.axhline(r["chance"], color="black", linestyle="--", label="random choice")
        ax.set_xticks(x, [str(o) for o in r["offsets"]])
        ax.set(xlabel="window end, tokens before the prompt's end", ylabel="hit rate", ylim=(0, 1.02),
               title=f"{r['length']} tokens: one line per layer (dark = first)")
        ax.legend(fontsize=7)
        ax = axes[2 * i + 1]
        sem = np.array(r["hit_rate_sem"]) if r["hit_rate_sem"] is not None else np.zeros_like(hits)
        for j, o in enumerate(r["offsets"]):
            ax.errorbar(np.arange(layers), hits[:, j], yerr=1.96 * sem[:, j], marker=".", capsize=2,
                        label=f"window end -{o}")
        ax.axhline(r["chance"], color="black", linestyle="--")
        ax.set(xlabel="layer", ylabel="hit rate", ylim=(0, 1.02),
               title=f"top {r['top']} of the prefix, {r['generated']} generated tokens, n={r['n']}")
        ax.legend(fontsize=7, ncol=2)
    ctx.save_figure(fig, "observation_hit_rate")
