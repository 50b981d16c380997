"""`make demo`: pass-key retrieval from a ~4K-token prompt on the default model, a compression method
(SnapKV unless `--method` names another) vs the full cache.

A random five-digit pass key is hidden at a random depth of repetitive filler text; the model is asked
for it at the end. SnapKV (C=1024, so about a quarter of the prompt's KV is kept) should retrieve it just
like the full cache does, because the question in the observation window attends to the key's
positions (the paper's premise, arXiv 2404.14469 section 3); StreamingLLM or RandomKV at the same budget
show what happens without that signal.
"""

from __future__ import annotations

import argparse
import random
import sys

from snapkv_jax.cli import METHODS, report, run
from snapkv_jax.compression import KVzip

_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
          "Find it and remember it. I will ask you about it at the end.\n")
_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
_QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, target_tokens: int, seed: int) -> tuple[str, str]:
    """(prompt, pass key): filler around the key sentence, sized to about `target_tokens` tokens."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    per_filler = len(tokenizer(_FILLER)["input_ids"])
    fixed = len(tokenizer(_INTRO + needle + _QUESTION)["input_ids"])
    repeats = max(2, (target_tokens - fixed) // per_filler)
    before = rng.randint(1, repeats - 1)
    text = _INTRO + _FILLER * before + needle + _FILLER * (repeats - before) + _QUESTION
    return text, key


def main(argv=None) -> int:
    """Runs the demo; returns 0, or 2 after one `snapkv-demo: error:` line on stderr for bad input."""
    p = argparse.ArgumentParser(prog="snapkv-demo", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="converted checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt-tokens", type=int, default=4000)
    p.add_argument("--capacity", type=int, default=1024)
    p.add_argument("--method", default="snapkv", choices=sorted(METHODS), help="compression method to compare "
                   "with the full cache")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        _demo(args)
    except (ValueError, OSError, ModuleNotFoundError) as e:  # ModuleNotFoundError: the default GGUF without gguf
        p.exit(2, f"snapkv-demo: error: {' '.join(str(e).split())}\n")
    return 0


def _demo(args) -> None:
    """The demo for parsed arguments; raises ValueError / OSError for bad ones, before the model loads
    where it can (KVzip's instruction needs the model's tokenizer)."""
    from snapkv_jax import checkpoint
    from snapkv_jax.cli import encode
    from snapkv_jax.compile_cache import enable_compilation_cache
    cls = METHODS[args.method]
    method = None if cls is KVzip else cls(capacity=args.capacity)
    enable_compilation_cache()
    if args.checkpoint:
        directory = args.checkpoint
    else:
        from snapkv_jax.default_model import default_checkpoint_dir
        directory = default_checkpoint_dir()
    cfg, params, tokenizer = checkpoint.load(directory)
    if method is None:  # the prompt is raw text (`encode(..., raw=True)`), so no chat template
        method = KVzip.from_tokenizer(tokenizer, args.capacity)
    text, key = passkey_prompt(tokenizer, args.prompt_tokens, args.seed)
    prompt = encode(tokenizer, text, raw=True)
    print(f"pass key hidden in a {prompt.shape[1]}-token prompt: {key}", flush=True)
    found = {}
    for name, compress in ((method.name, method), ("full cache", None)):
        print(f"\n== {name} ==", flush=True)
        result = run(cfg, params, tokenizer, prompt, compress, max_new_tokens=12)
        found[name] = key in result["text"]
        print(f"answer: {result['text'].strip()!r}  ->  pass key {'RETRIEVED' if found[name] else 'missed'}")
        print(report(result, compress), flush=True)
    print("\nsummary: " + ", ".join(f"{n}: {'retrieved' if ok else 'missed'}" for n, ok in found.items()))


if __name__ == "__main__":
    sys.exit(main())
