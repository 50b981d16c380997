"""Accuracy cells: prompts through one method, answers scored, per-sample records kept for inspection."""

from __future__ import annotations

from typing import Sequence

from experiments import batching, methods, scoring
from experiments.harness import Cell, Context
from experiments.prompts import Prompt


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def record(prompt: Prompt, text: str, score: float) -> dict:
    return {**prompt.meta, "answers": list(prompt.answers), "output": text, "score": score}


def outputs(ctx: Context, prompts: Sequence[Prompt], method, advance) -> list[list[int]]:
    """Greedy continuations of `prompts` under `method`. Prompts with a `split` are prefilled up to it
    and fed the rest afterwards (all of one call must agree on having a split)."""
    kw = dict(max_new_tokens=ctx.scale.max_new_tokens, rows=ctx.scale.batch,
              eos_id=ctx.tokenizer.eos_token_id, on_batch=advance)
    split = {p.split is None for p in prompts}
    if split == {True}:
        return batching.generate(ctx.cfg, ctx.params, [p.ids for p in prompts], method, **kw)
    if split == {False}:
        return batching.generate_after(ctx.cfg, ctx.params, [p.ids[:p.split] for p in prompts],
                                       [p.ids[p.split:] for p in prompts], method, **kw)
    raise ValueError("prompts of one cell must all have a split or all have none")


def accuracy_cell(ctx: Context, key: str, prompts: Sequence[Prompt], method_name: str, budget: int | None,
                  config=None, **fields) -> Cell:
    """A cell that generates for `prompts` under `method_name` at `budget` and scores each output
    against its answers. `config`, when given, is the method object to run instead of the table's
    (e.g. SnapKV with other knobs). Its result: the method, budget, `fields`, scoring.cell stats and
    the samples."""

    def compute(advance):
        method = config if config is not None else methods.build(method_name, budget, seed=ctx.seed,
                                                                  tokenizer=ctx.tokenizer)
        texts = [decode(ctx.tokenizer, o) for o in outputs(ctx, prompts, method, advance)]
        scores = [scoring.found(t, p.answers) for t, p in zip(texts, prompts)]
        return ({"method": method_name, "budget": budget, **fields} | scoring.cell(scores)
                | {"samples": [record(p, t, s) for p, t, s in zip(prompts, texts, scores)]})

    return Cell(key=key, size=len(prompts), compute=compute)
