"""`snapkv-generate`: prompt in, text out, with a report of what SnapKV did to the KV cache.

The CLI runs the jitted `prefill` and then donated `decode_step`s, so it can time the two phases apart:
prefill seconds (compiled ahead of time, so compilation is excluded) and decode tokens/s of the step loop as
a notebook runs it (each step includes `decode_step`'s host-side checks and the sampling; the first step,
which compiles, is not timed). The text is the same as `snapkv_jax.generate` produces for the same settings.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from snapkv_jax import cache as kv
from snapkv_jax.config import SnapKVConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapkv-generate", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="converted checkpoint dir (snapkv-convert); default: the "
                     "embedded SmolLM2-135M-Instruct, converted once into the cache")
    src.add_argument("--hf", help="a Hugging Face Llama/Mistral dir (config.json, safetensors, tokenizer)")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="prompt text")
    text.add_argument("--prompt-file", help="file holding the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-snap", action="store_true", help="keep the full KV cache")
    p.add_argument("--window", type=int, default=SnapKVConfig.window, help="observation window w")
    p.add_argument("--capacity", type=int, default=SnapKVConfig.capacity, help="slots kept per KV head C")
    p.add_argument("--kernel", type=int, default=SnapKVConfig.kernel, help="pooling kernel size (odd)")
    p.add_argument("--pooling", default=SnapKVConfig.pooling, help="maxpool | avgpool | none")
    p.add_argument("--gqa-reduce", default=SnapKVConfig.gqa_reduce, help="mean | max")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="params dtype for --hf and the default model")
    return p


def load_model(args):
    """(cfg, params, tokenizer) from --checkpoint, --hf, or the default model."""
    import jax.numpy as jnp

    from snapkv_jax import checkpoint, hf_weights
    if args.hf:
        cfg, params = hf_weights.load_hf(args.hf, dtype=getattr(jnp, args.dtype))
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.hf)
        except Exception as e:
            raise ValueError(f"{args.hf} has no usable tokenizer: {e}") from None
        return cfg, params, tokenizer
    if args.checkpoint:
        directory = args.checkpoint
    else:
        from snapkv_jax.default_model import default_checkpoint_dir
        directory = default_checkpoint_dir(args.dtype)
    cfg, params, tokenizer = checkpoint.load(directory)
    if tokenizer is None:
        raise ValueError(f"{directory} holds no tokenizer; convert it with its tokenizer files")
    return cfg, params, tokenizer


def encode(tokenizer, text: str, chat: bool) -> np.ndarray:
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(text)["input_ids"]
    if not ids:
        raise ValueError("empty prompt: the text encodes to no tokens")
    return np.asarray(ids, np.int32)[None]


def run(cfg, params, tokenizer, prompt: np.ndarray, snap: SnapKVConfig | None, max_new_tokens: int,
        temperature=0.0, top_k=0, top_p=1.0, seed=0) -> dict:
    """Prefill + decode one prompt `[1, T]`; returns the text, the new tokens and the report fields."""
    from snapkv_jax.generate import _prefill, check_generation, decode_step, prompt_slots, sample

    length = prompt.shape[1]
    lengths = np.array([length], np.int32)
    check_generation(cfg, length, max_new_tokens, temperature, top_k, top_p, None, seed)
    slots = prompt_slots(length, snap) + max_new_tokens
    sk_prefill = _prefill.lower(params, prompt, lengths, cfg=cfg, slots=slots, snap=snap, snap_impl="auto",
                                implementation=None).compile()
    start = time.perf_counter()
    logits, cache = jax.block_until_ready(sk_prefill(params, prompt, lengths))
    prefill_s = time.perf_counter() - start
    kept = [int(n) for n in np.asarray(kv.valid_slots(cache))[:, 0].max(-1)]  # prompt slots per layer
    pick = jax.jit(sample, static_argnames=("greedy", "top_k", "use_top_p"))
    key = jax.random.key(seed)
    sampling = dict(greedy=temperature == 0.0, top_k=top_k, use_top_p=top_p < 1.0)
    temp, nucleus = np.float32(max(temperature, 1e-6)), np.float32(top_p)
    eos = cfg.eos_token_id if tokenizer.eos_token_id is None else tokenizer.eos_token_id
    new, timed_steps, decode_s = [], 0, 0.0
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token = int(pick(logits, sub, temp, nucleus, **sampling)[0])
        new.append(token)
        if token == eos or i == max_new_tokens - 1:
            break
        start = time.perf_counter()
        logits, cache = jax.block_until_ready(decode_step(params, cfg, np.array([token]), cache, donate=True))
        if i > 0:  # the first step compiles; time the rest
            decode_s += time.perf_counter() - start
            timed_steps += 1
    item = np.dtype(cache.k[0].dtype).itemsize
    per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * item    # K and V of one position
    return dict(
        text=tokenizer.decode(new, skip_special_tokens=True), tokens=new, prompt_tokens=length,
        kept_slots=kept, kv_bytes_full=per_slot * (length + len(new)),
        kv_bytes_cache=per_slot * (max(kept) + len(new)), prefill_s=prefill_s,
        decode_tokens_per_s=timed_steps / decode_s if timed_steps else float("nan"))


def report(result: dict, snap: SnapKVConfig | None) -> str:
    kept = result["kept_slots"]
    kept_text = (f"{kept[0]} in each of {len(kept)} layers" if len(set(kept)) == 1 else
                 ", ".join(map(str, kept)))
    mode = ("full cache (--no-snap)" if snap is None else
            f"SnapKV window={snap.window} capacity={snap.capacity} kernel={snap.kernel} "
            f"pooling={snap.pooling} gqa_reduce={snap.gqa_reduce}")
    full, ours = result["kv_bytes_full"], result["kv_bytes_cache"]
    return "\n".join([
        f"mode: {mode}",
        f"prompt tokens: {result['prompt_tokens']}",
        f"kept prompt slots per layer: {kept_text}",
        f"KV-cache bytes: full {full / 2**20:.2f} MiB, this cache {ours / 2**20:.2f} MiB "
        f"({full / ours:.2f}x smaller)",
        f"prefill: {result['prefill_s']:.3f} s",
        f"decode: {result['decode_tokens_per_s']:.1f} tokens/s ({len(result['tokens'])} tokens)",
    ])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        snap = None if args.no_snap else SnapKVConfig(args.window, args.capacity, args.kernel, args.pooling,
                                                      args.gqa_reduce)
        if args.prompt_file:
            with open(args.prompt_file) as f:
                text = f.read()
        else:
            text = args.prompt
        cfg, params, tokenizer = load_model(args)
        prompt = encode(tokenizer, text, args.chat)
        result = run(cfg, params, tokenizer, prompt, snap, args.max_new_tokens, args.temperature,
                     args.top_k, args.top_p, args.seed)
    except (ValueError, FileNotFoundError, OSError) as e:
        parser.exit(2, f"snapkv-generate: error: {e}\n")
    print(result["text"])
    print("---", file=sys.stderr)
    print(report(result, snap), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
