"""`python -m experiments.run NAME --out DIR [--scale small|full] [--methods ...] [--budgets ...]
[--lengths ...] [--samples N] [--seed S] [--dtype float32|bfloat16] [--checkpoint CKPT]`: runs one study of
`experiments/studies/`, or `all` of them (each into DIR/<study>/, in one process, so they share the
loaded model and the compiled programs).

`--scale small` is a CPU-sized run (what the tests run); `--scale full` is the GPU run behind
experiments/results/. Bad input (unknown study or method, a budget <= the window, ...) prints one line
on stderr and exits with status 2. Rerunning into the same DIR resumes: finished cells are loaded, not
recomputed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from conversion.atomic import creation_blocker
from experiments import harness
from experiments.prompts import PromptTooShortError
from experiments.studies import (long_generation, many_questions, needle, observation, passkey, pooling,
                                 question_position, ruler)
from snapkv_jax.generate import check_seed

STUDIES = {m.NAME: m for m in (observation, needle, passkey, pooling, ruler, question_position, many_questions,
                               long_generation)}
ALL = "all"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m experiments.run", description=__doc__.splitlines()[0])
    p.add_argument("name", help=f"the study: {', '.join(STUDIES)}, or {ALL}")
    p.add_argument("--out", required=True, help="output directory (created; reused to resume)")
    p.add_argument("--scale", choices=("small", "full"), default="small")
    p.add_argument("--methods", nargs="+", help="compression methods (default: the scale's)")
    p.add_argument("--budgets", nargs="+", type=int, help="KV capacities per layer, row and KV head")
    p.add_argument("--lengths", nargs="+", type=int, help="context lengths in tokens (default: the scale's)")
    p.add_argument("--samples", type=int, help="prompts per accuracy cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=harness.DTYPES, help="params dtype (default: the scale's)")
    p.add_argument("--checkpoint", help="a converted checkpoint (default: SmolLM2-135M-Instruct)")
    return p


def _scale(study, args) -> harness.Scale:
    scale = study.SCALES[args.scale]
    for name in ("methods", "budgets", "lengths"):  # each value names cells: twice would be one cell twice
        values = getattr(args, name) or []
        if twice := sorted({str(v) for v in values if values.count(v) > 1}):
            raise ValueError(f"--{name} names {', '.join(twice)} more than once")
    if args.methods is not None:
        if not scale.methods:
            raise ValueError(f"{study.NAME} compares no methods; drop --methods")
        scale = dataclasses.replace(scale, methods=tuple(args.methods))
    for name in ("budgets", "lengths", "samples", "dtype"):
        value = getattr(args, name)
        if value is not None:
            scale = dataclasses.replace(scale, **{name: tuple(value) if name in ("budgets", "lengths") else value})
    harness.validate(study, scale)
    return scale


def _check_writable(out: str, given: str) -> None:
    """Raises ValueError unless `out` is, or can be created as, a writable directory: before any cell
    runs, not when the first result is written."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise ValueError(f"--out {given} exists and is not a directory")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"--out {given} is not writable")
    elif blocker := creation_blocker(out):
        raise ValueError(f"--out {given} cannot be created: {blocker}")


def settings_from(argv: list[str]) -> list[tuple[object, harness.Settings]]:
    """(study module, Settings) pairs to run from command-line arguments. Raises ValueError on bad input."""
    args = _parser().parse_args(argv)
    if args.name == ALL:
        if args.methods or args.budgets or args.lengths or args.samples:
            raise ValueError(f"{ALL} takes no --methods, --budgets, --lengths or --samples; run studies one by one "
                             f"for those")
        names = list(STUDIES)
    elif args.name in STUDIES:
        names = [args.name]
    else:
        raise ValueError(f"unknown experiment {args.name!r}; known: {', '.join(STUDIES)}, {ALL}")
    if args.checkpoint is not None and not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such directory")
    check_seed(args.seed)
    out = os.path.abspath(args.out)
    _check_writable(out, args.out)
    return [(STUDIES[n], harness.Settings(
        name=n, out=os.path.join(out, n) if args.name == ALL else out, scale_name=args.scale,
        scale=_scale(STUDIES[n], args), seed=args.seed, checkpoint=args.checkpoint, argv=tuple(argv)))
        for n in names]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # bad input: one line, status 2; an error inside a running study keeps its traceback
        runs = [(study, harness.Context(settings)) for study, settings in settings_from(argv)]
        for _, ctx in runs:
            ctx.check_lengths()
    except (ValueError, FileNotFoundError) as e:
        print(f"experiments.run: error: {e}", file=sys.stderr)
        return 2
    for study, ctx in runs:
        try:
            doc = harness.execute(study, ctx)
        except PromptTooShortError as e:  # found while building the prompts: bad --lengths, one line
            print(f"experiments.run: error: {ctx.settings.name}: a context length of {ctx.scale.lengths} is too "
                  f"short for its prompts (raise --lengths): {e}", file=sys.stderr)
            return 2
        print(f"{ctx.settings.name}: wrote {os.path.join(ctx.out, 'results.json')} ({doc['seconds']} s)")
    return 0


if __name__ == "__main__":
    import snapkv_jax as sk
    sk.enable_compilation_cache()  # a resumed run loads the programs its first try compiled
    sys.exit(main())
