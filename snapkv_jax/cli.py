"""`snapkv-generate`: prompt in, text out, with a report of what the compression method did to the cache.

The CLI compiles the prefill and the decode step ahead of time and times the phases apart: compilation
(loaded from JAX's persistent compilation cache after the first run: `snapkv_jax.compile_cache`),
prefill, and decode tokens/s of the donated `decode_step` loop as a notebook runs it (each step includes
`decode_step`'s host-side checks and the sampling). The text is what `snapkv_jax.generate` produces for
the same settings. Prompts go through the tokenizer's chat template when it has one (`--raw` sends the
text as it is).

`--chat` opens a conversation instead (`chat_loop`): one user turn per line on stdin (readline editing
on a terminal; Ctrl-D ends it), each answer streamed to stdout as it is decoded, and each turn's report
on stderr. The turns share one cache (`sk.Chat`); `--prompt`/`--prompt-file`, if given, is the first
turn (a document to ask about, say), and `--recompress-at N` keeps the live cache within N slots.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

from snapkv_jax.compression import H2O, AdaKV, KVzip, PyramidKV, RandomKV, SnapKV, StreamingLLM

METHODS = {cls.name: cls for cls in (SnapKV, StreamingLLM, H2O, RandomKV, PyramidKV, AdaKV, KVzip)}
FULL = "full"
# CLI flag -> method field, for the knobs any method may take.
_KNOBS = {"window": "window", "capacity": "capacity", "kernel": "kernel", "pooling": "pooling",
          "gqa_reduce": "gqa_reduce", "sinks": "sinks", "normalize": "normalize", "beta": "beta",
          "alpha": "alpha", "max_per_head": "max_per_head", "selection_seed": "seed", "budget": "budget",
          "reconstruct_chunk": "chunk"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapkv-generate", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="converted checkpoint dir (snapkv-convert); default: the "
                     "embedded SmolLM2-135M-Instruct, converted once into the cache")
    src.add_argument("--hf", help="a Hugging Face Llama/Mistral dir (config.json, safetensors, tokenizer)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--prompt", help="prompt text (required unless --chat)")
    text.add_argument("--prompt-file", help="file holding the prompt text")
    p.add_argument("--chat", action="store_true",
                   help="a conversation: one turn per line on stdin, Ctrl-D ends it; --prompt is the first turn")
    p.add_argument("--recompress-at", type=int, metavar="N",
                   help="--chat: re-compress the live cache with the method when a turn would pass N slots")
    p.add_argument("--raw", action="store_true",
                   help="send the text as it is (default: wrap it in the tokenizer's chat template, if any)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--method", help=f"{FULL} (no compression) or one of {', '.join(METHODS)} (default snapkv)")
    p.add_argument("--no-snap", action="store_true", help=f"the same as --method {FULL}")
    p.add_argument("--chunk", default="auto", help="tokens per prefill chunk: auto, none, or an integer")
    p.add_argument("--mesh", metavar="AXIS=N,...",
                   help="run over several devices, e.g. model=2 or seq=2,model=2 (axes data, seq, model)")
    knobs = p.add_argument_group("method knobs (each applies to the methods that have it)")
    knobs.add_argument("--capacity", type=int, help="slots kept per (layer, KV head) C (default 1024)")
    knobs.add_argument("--window", type=int, help="observation / recent window w (default 32)")
    knobs.add_argument("--kernel", type=int, help="pooling kernel size, odd (snapkv, pyramidkv, adakv)")
    knobs.add_argument("--pooling", help="maxpool | avgpool | none (snapkv, pyramidkv, adakv)")
    knobs.add_argument("--gqa-reduce", help="mean | max (snapkv, h2o, pyramidkv, adakv)")
    knobs.add_argument("--sinks", type=int, help="attention sinks kept (streamingllm, kvzip)")
    knobs.add_argument("--normalize", action="store_true", default=None,
                       help="divide each key's score by the queries that see it (h2o); KVzip+ (kvzip)")
    knobs.add_argument("--beta", type=int, help="pyramid steepness (pyramidkv)")
    knobs.add_argument("--alpha", type=float, help="per-head safeguard share (adakv)")
    knobs.add_argument("--max-per-head", type=int,
                       help="most prefix slots one head may take (adakv; kvzip with --budget global)")
    knobs.add_argument("--budget", help="layer | global: per layer, or ranked across layers and heads (kvzip)")
    knobs.add_argument("--reconstruct-chunk", type=int, help="context tokens per reconstruction chunk (kvzip)")
    knobs.add_argument("--selection-seed", type=int, help="seed of the random choice (random)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="params dtype for --hf and the default model (default float32); a --checkpoint "
                        "keeps the dtype it was converted to")
    return p


def method_from_args(args, tokenizer=None):
    """The compression method the flags name, or None for the full cache. KVzip spells its
    reconstruction instruction with `tokenizer` (in its chat template unless --raw). Raises ValueError
    for an unknown method, a knob the method does not have, or KVzip without a tokenizer."""
    cls, knobs = _method_knobs(args)
    if cls is None:
        return None
    if cls is KVzip:
        if tokenizer is None:
            raise ValueError("--method kvzip needs the model's tokenizer")
        chat = not args.raw and bool(getattr(tokenizer, "chat_template", None))
        return KVzip.from_tokenizer(tokenizer, chat=chat, **knobs)
    return cls(**knobs)


def _method_knobs(args):
    """(method class or None for the full cache, its fields from the flags); ValueError as above."""
    if args.no_snap and args.method not in (None, FULL):
        raise ValueError(f"--no-snap (the full cache) contradicts --method {args.method}")
    name = FULL if args.no_snap else SnapKV.name if args.method is None else args.method
    given = {flag: getattr(args, flag) for flag in _KNOBS if getattr(args, flag) is not None}
    if name == FULL:
        if given:
            raise ValueError(f"--{next(iter(given)).replace('_', '-')} does not apply to the full cache")
        return None, {}
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; use {FULL} or one of {', '.join(METHODS)}")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    for flag in given:
        if _KNOBS[flag] not in fields:
            raise ValueError(f"--{flag.replace('_', '-')} does not apply to --method {name}")
    return cls, {_KNOBS[flag]: value for flag, value in given.items()}


def parse_chunk(text: str):
    if text == "auto":
        return "auto"
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--chunk must be auto, none or an integer, got {text!r}") from None


def load_model(args, mesh=None):
    """(cfg, params, tokenizer) from --checkpoint, --hf, or the default model; params on `mesh` if given."""
    import jax.numpy as jnp

    from snapkv_jax import checkpoint, hf_weights
    if args.hf:
        cfg, params = hf_weights.load_hf(args.hf, dtype=getattr(jnp, args.dtype or "float32"), mesh=mesh)
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.hf)
        except Exception as e:
            raise ValueError(f"{args.hf} has no usable tokenizer: {' '.join(str(e).split())[:300]}") from None
        return cfg, params, tokenizer
    if args.checkpoint:
        directory = args.checkpoint
    else:
        from snapkv_jax.default_model import default_checkpoint_dir
        directory = default_checkpoint_dir(args.dtype or "float32")
    if args.checkpoint and args.dtype not in (None, stored := checkpoint.params_dtype(directory)):
        raise ValueError(f"--dtype {args.dtype}: {directory} holds {stored} params, the dtype it was "
                         f"converted to (convert it again with --dtype {args.dtype})")
    cfg, params, tokenizer = checkpoint.load(directory, mesh)
    if tokenizer is None:
        raise ValueError(f"{directory} holds no tokenizer; convert it with its tokenizer files")
    return cfg, params, tokenizer


def read_prompt_file(path: str) -> str:
    """The file's text; ValueError naming the file if it is not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def encode(tokenizer, text: str, raw: bool = False) -> np.ndarray:
    """`[1, T]` token ids: the text in the tokenizer's chat template as a user turn (when it has one and
    not `raw`), else the text as it is."""
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(text)["input_ids"]
    if not ids:
        raise ValueError("empty prompt: the text encodes to no tokens")
    return np.asarray(ids, np.int32)[None]


def run(cfg, params, tokenizer, prompt: np.ndarray, compress, max_new_tokens: int, temperature=0.0, top_k=0,
        top_p=1.0, seed=0, chunk="auto", mesh=None) -> dict:
    """Prefill + decode one prompt `[1, T]`; returns the text, the new tokens and the report fields."""
    import jax

    from snapkv_jax import cache as kv
    from snapkv_jax import compression, sharding
    from snapkv_jax import layer_prefill
    from snapkv_jax.compression.scoring import resolve_impl
    from snapkv_jax.generate import _check_chunk, _decode_donated, check_decode, check_generation, plan_prefill
    from snapkv_jax.generate import sample

    compression.check_method(compress, cfg.num_layers)
    _check_chunk(chunk)
    length = prompt.shape[1]
    lengths = np.array([length], np.int32)
    check_generation(cfg, length, max_new_tokens, temperature, top_k, top_p, None, seed)
    sharding.check_mesh(mesh, cfg, batch=1)
    plan = plan_prefill(params, cfg, prompt, compress, chunk, max_new_tokens, None, mesh)
    if mesh is not None:
        prompt, lengths = sharding.place_rows(mesh, prompt, lengths)
    start = time.perf_counter()
    programs = layer_prefill.programs(params, cfg, prompt, lengths, plan=plan, compress=compress,
                                      impl=resolve_impl("auto", cfg.head_dim), attention=None,
                                      ahead_of_time=True, mesh=mesh)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    logits, cache = jax.block_until_ready(layer_prefill.run(
        params, cfg, prompt, lengths, plan=plan, programs=programs,
        progress=layer_prefill.auto_progress(plan, 1)))
    prefill_s = time.perf_counter() - start
    kept = [int(n) for n in np.asarray(kv.valid_slots(cache))[:, 0].max(-1)]  # prompt slots per layer
    held_prompt = kv.held_bytes(cache)
    allocated = kv.allocated_bytes(cache)
    pick = jax.jit(sample, static_argnames=("greedy", "top_k", "use_top_p"))
    key = jax.random.key(seed)
    sampling = dict(greedy=temperature == 0.0, top_k=top_k, use_top_p=top_p < 1.0)
    temp, nucleus = np.float32(max(temperature, 1e-6)), np.float32(top_p)
    eos = cfg.eos_token_id if tokenizer.eos_token_id is None else tokenizer.eos_token_id
    start = time.perf_counter()
    step = _decode_donated.lower(params, np.zeros(1, np.int32), cache, cfg=cfg).compile()
    compile_s += time.perf_counter() - start
    new, steps, decode_s = [], 0, 0.0
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token = int(pick(logits, sub, temp, nucleus, **sampling)[0])
        new.append(token)
        if token == eos or i == max_new_tokens - 1:
            break
        start = time.perf_counter()
        check_decode(cfg, np.array([token]), cache)
        logits, cache = jax.block_until_ready(step(params, np.array([token], np.int32), cache))
        decode_s += time.perf_counter() - start
        steps += 1
    item = np.dtype(cache.k[0].dtype).itemsize
    per_slot = 2 * cfg.num_kv_heads * cfg.head_dim * item                       # K and V, one layer
    return dict(
        text=tokenizer.decode(new, skip_special_tokens=True), tokens=new, prompt_tokens=length,
        kept_slots=kept, kv_bytes_full=per_slot * cfg.num_layers * (length + len(new)),
        kv_bytes_held=held_prompt + per_slot * cfg.num_layers * len(new), kv_bytes_allocated=allocated,
        chunk=plan.chunk if plan.chunk < plan.padded else None, compile_s=compile_s,
        prefill_s=prefill_s, decode_steps=steps, decode_s=decode_s)


def report(result: dict, compress) -> str:
    kept = result["kept_slots"]
    kept_text = (f"{kept[0]} in each of {len(kept)} layers" if len(set(kept)) == 1 else
                 ", ".join(map(str, kept)))
    mode = "full cache" if compress is None else compress.describe()
    full, held, allocated = result["kv_bytes_full"], result["kv_bytes_held"], result["kv_bytes_allocated"]
    steps = result["decode_steps"]
    decode = (f"decode: {steps / result['decode_s']:.1f} tokens/s ({steps} steps, {len(result['tokens'])} "
              f"tokens)" if steps else f"decode: no decode step ({len(result['tokens'])} token)")
    return "\n".join([
        f"mode: {mode}",
        f"prompt tokens: {result['prompt_tokens']}"
        + (f" (prefilled in chunks of {result['chunk']})" if result["chunk"] else ""),
        f"kept prompt slots per layer: {kept_text}",
        f"KV-cache bytes: full {full / 2**20:.2f} MiB, this cache holds {held / 2**20:.2f} MiB "
        f"({full / held:.2f}x smaller) in {allocated / 2**20:.2f} MiB allocated",
        f"compile: {result['compile_s']:.3f} s",
        f"prefill: {result['prefill_s']:.3f} s",
        decode,
    ])


def _turns(first: str | None):
    """The chat's user turns: `first`, then stdin's lines until EOF (Ctrl-D); blank lines are skipped.
    On a terminal, `input` edits lines with readline and shows a prompt."""
    if first is not None and first.strip():
        yield first
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:
            pass
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print()
            return
        if line.strip():
            yield line


def chat_loop(cfg, params, tokenizer, args, compress, chunk, first: str | None) -> int:
    """The `--chat` session: streams each answer to stdout, its report to stderr. Returns 0 at EOF.
    Raises ValueError for bad sampling flags or a turn the engine refuses (a full cache, say)."""
    from snapkv_jax.cache import valid_slots
    from snapkv_jax.generate import check_generation
    from snapkv_jax.sampler import Chat, Sampler
    from snapkv_jax.sampling import from_kwargs

    # as `run` does: a bad --top-k or --top-p is refused also when --temperature 0 makes it unused
    check_generation(cfg, None, args.max_new_tokens, args.temperature, args.top_k, args.top_p, None, args.seed)
    sampling = from_kwargs(args.temperature, args.top_k, args.top_p)
    sampler = Sampler(params, cfg, tokenizer, compress=compress, chunk=chunk,
                      chat_template=False if args.raw else "auto")
    chat = Chat(sampler, recompress_at=args.recompress_at)
    for number, text in enumerate(_turns(first), 1):
        start = time.perf_counter()
        stream = chat.send(text, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed, stream=True)
        for piece in stream:
            print(piece, end="", flush=True)
        print(flush=True)
        seconds = time.perf_counter() - start
        live = int(np.asarray(valid_slots(chat.cache)).max())                   # widest (layer, row, head)
        print(f"--- turn {number}", file=sys.stderr)
        print(stream.result.stats.report(), file=sys.stderr)
        print(f"live cache slots: {live} (widest layer); turn time: {seconds:.2f} s", file=sys.stderr, flush=True)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cls, knobs = _method_knobs(args)  # bad method flags fail before the model loads
        compress = None if cls in (None, KVzip) else cls(**knobs)
        chunk = parse_chunk(args.chunk)
        if args.prompt_file:
            text = read_prompt_file(args.prompt_file)
        else:
            text = args.prompt
        if text is None and not args.chat:
            raise ValueError("give --prompt or --prompt-file (or --chat for a conversation on stdin)")
        if args.recompress_at is not None and not args.chat:
            raise ValueError("--recompress-at applies to --chat")
        if args.recompress_at is not None and cls is None:
            raise ValueError("--recompress-at needs a compression method; the full cache (--method full or "
                             "--no-snap) has none")
        if args.recompress_at is not None:
            from snapkv_jax.sampler import check_reselects_live
            check_reselects_live(cls, "--recompress-at", cls.name)
        from snapkv_jax.compile_cache import enable_compilation_cache
        enable_compilation_cache()
        from snapkv_jax.sharding import parse_mesh
        mesh = None if args.mesh is None else parse_mesh(args.mesh)
        cfg, params, tokenizer = load_model(args, mesh)
        if cls is KVzip:  # its instruction is spelt in the model's tokens
            compress = method_from_args(args, tokenizer)
        if args.chat:
            return chat_loop(cfg, params, tokenizer, args, compress, chunk, text)
        prompt = encode(tokenizer, text, args.raw)
        result = run(cfg, params, tokenizer, prompt, compress, args.max_new_tokens, args.temperature,
                     args.top_k, args.top_p, args.seed, chunk, mesh)
    except (ValueError, OSError, ModuleNotFoundError) as e:  # ModuleNotFoundError: the default GGUF without gguf
        parser.exit(2, f"snapkv-generate: error: {' '.join(str(e).split())}\n")
    print(result["text"])
    print("---", file=sys.stderr)
    print(report(result, compress), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
