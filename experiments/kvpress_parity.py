"""Our compression methods against NVIDIA kvpress's presses on the same prompts (CPU, float32, tiny models).

For each press and a tiny random HF Llama (GQA 8/2 and MHA 4/4), on random prompts of several lengths
(batch 1, as kvpress runs): kvpress compresses the HF model's DynamicCache inside `with press(model):`
during prefill, as its pipeline does; we run `sk.prefill(..., compress=<our method with the matching
settings>)` on the same weights (`sk.load_hf` of the same safetensors dir). Compared:

  * kept positions per (layer, KV head): kvpress's are recovered by matching its compressed keys against
    an uncompressed run's keys (ScorerPress, PyramidKV), or as the complement of the `masked_key_indices`
    it leaves on each attention module (AdaKV, KVzip, which mask instead of cutting); ours are the cache's
    `pos`. A differing set is a float tie when every swapped pair's kvpress scores (hooked from the
    press) lie within TIE of each other, relative to the (layer, head)'s largest score.
  * logits: the prefill's last-token logits and DECODE greedy decode steps fed the same tokens (kvpress's
    argmaxes) at positions T, T+1, ...; max |ours - kvpress| over all of them.

Then one context, many questions (`--pipeline-lengths`): kvpress's own pipeline (its `_forward`: the context
prefilled under the press, each question answered greedily on that cache in turn) against
`generate(..., context=)` with the questions as one ragged batch: the answers' tokens, and their logits
against `extend(..., context=)` steps.

Then decode-time compression (`--decoding`, on by default; `--decoding-only` runs it alone and merges its
rows into the json already under --out): kvpress's `DecodingPress` / `PrefillDecodingPress` against
`generate(..., decode_compress=, interval=)`, prompt 64, interval 8, target 32, 32 greedy tokens: kept
positions after each compression, tokens, logits; "patched" rows change kvpress (`in_position_order`,
`SnapKVTruePositions`) to show which of its quirks accounts for a difference.

The mapping of knobs: kvpress keeps n = compute_n_kept(T, compression_ratio) = max(1, int(T * (1 - r)))
pairs per (layer, head), so our `capacity` is that n, computed with kvpress's own function. Window, kernel
and pooling are kvpress's (avgpool, GQA mean). Where a press's rule differs from ours (the CASES' `note`),
the row says so and, if one exists, a second row gives the setting of ours that reproduces kvpress.
RandomPress is not compared: it draws torch.rand scores from a torch Generator, ours hashes (seed, layer,
head, position) (compression/random_kv.py); no seed maps one onto the other.

kvpress 0.5.5 needs transformers < 5.3, which conflicts with our pin, so it runs in a venv of its own:

    python3 -m venv /tmp/kvp
    /tmp/kvp/bin/pip install torch==2.13.0 "transformers<5.3" kvpress==0.5.5 jax==0.10.2 flax optax \\
        orbax-checkpoint safetensors tqdm numpy tokenizers
    JAX_PLATFORMS=cpu PYTHONPATH=$PWD /tmp/kvp/bin/python -m experiments.kvpress_parity \\
        --out experiments/results

(a CPU torch wheel; the run takes about 6-8 minutes on 2 cores). Writes kvpress_parity.json and
kvpress_parity_table.md (one row per model, length and press) under --out; kvpress_parity.md there
discusses them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import sys
import tempfile
from importlib import metadata

import numpy as np
import torch
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

import kvpress
from kvpress.utils import compute_n_kept

import snapkv_jax as sk
from experiments import harness
from snapkv_jax.generate import prompt_slots

DECODE = 4          # greedy decode steps compared after the prefill
TIE = 1e-5          # a swapped pair closer than this (relative to the head's top score) is a float tie
VOCAB = 128         # one token per ASCII character (the tokenizer KVzip's instructions need)

MODELS = {
    "gqa": dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8),
    "mha": dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16),
}


# --- the tiny model and its tokenizer -----------------------------------------------------------

def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Token id = the character's code point (ASCII), no special tokens, no chat template."""
    tok = Tokenizer(models.WordLevel({chr(i): i for i in range(VOCAB)}, unk_token=chr(0)))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def build_model(name: str, directory: str, seed: int = 0) -> str:
    """Saves a seeded float32 random Llama (weights N(0, 0.1), norm weights perturbed from 1, as
    tests/hf_models.py builds them) and the character tokenizer into `directory`."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, intermediate_size=128, max_position_embeddings=1024,
                                      rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=False,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=0, **MODELS[name])
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    char_tokenizer().save_pretrained(directory)
    return directory


def load_hf_torch(directory: str, attn: str):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                             attn_implementation=attn).eval()


# --- kvpress's side -----------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    kept: list            # per layer, per KV head: sorted list of kept prompt positions
    logits: np.ndarray    # [1 + DECODE, V]: the prefill's last token, then each decode step
    tokens: list          # the DECODE tokens fed (kvpress's greedy choices)
    scores: list | None   # per layer `[K, T]` kvpress's scores (for the tie analysis), if hooked
    budgets: list | None = None  # per layer, kvpress's kept count (PyramidKV)
    error: str | None = None     # why kvpress stopped decoding early, if it did


def full_keys(model, ids: torch.Tensor) -> list[np.ndarray]:
    """Per layer `[K, T, D]` keys of an uncompressed prefill."""
    cache = transformers.DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    return [layer.keys[0].numpy() for layer in cache.layers]


def match_rows(full: np.ndarray, kept: np.ndarray) -> list[np.ndarray]:
    """`full [K, T, D]`, `kept [K, n, D]` (a subset of each head's rows, in any order) -> per head the
    row of `full` each kept row is, in `kept`'s order."""
    out = []
    for head in range(full.shape[0]):
        dist = np.abs(kept[head][:, None, :] - full[head][None, :, :]).max(-1)          # [n, T]
        rows = dist.argmin(-1)
        if dist[np.arange(len(rows)), rows].max() > 1e-6 or len(set(rows.tolist())) != len(rows):
            raise RuntimeError("a compressed key matches no key (or two) of the uncompressed cache")
        out.append(rows)
    return out


def match_positions(full: np.ndarray, kept: np.ndarray) -> list[list[int]]:
    """`full [K, T, D]` (row = position), `kept [K, n, D]` -> per head the sorted kept positions."""
    return [sorted(rows.tolist()) for rows in match_rows(full, kept)]


def hook_scores(press, store: list):
    """Wraps `press.score` so each layer's `[K, T]` scores are appended to `store`."""
    original = press.score

    def score(*args, **kwargs):
        s = original(*args, **kwargs)
        store.append(s[0].detach().float().numpy().copy())
        return s

    press.score = score


def run_kvpress(model, ids: torch.Tensor, press, full: list[np.ndarray], masked: bool) -> Run:
    """Prefill under `press`, then DECODE greedy steps as kvpress's pipeline decodes (position ids
    T, T+1, ...). `masked`: the press masks keys (AdaKV, KVzip) instead of cutting the cache."""
    scores: list = []
    inner = press.press if isinstance(press, kvpress.AdaKVPress) else press
    budgets: list = []
    if isinstance(press, kvpress.KVzipPress):
        original = press.compress_post

        def compress_post(m):
            scores.extend(s[0].float().numpy().copy() for s in press.score_val)
            return original(m)

        press.compress_post = compress_post
    elif hasattr(inner, "score"):
        hook_scores(inner, scores)
    if isinstance(press, kvpress.PyramidKVPress):
        original_budget = press.get_layer_budget

        def get_layer_budget(module, q_len):
            n = original_budget(module, q_len)
            budgets.append(n)
            return n

        press.get_layer_budget = get_layer_budget
    t = ids.shape[1]
    cache = transformers.DynamicCache()
    with torch.no_grad():
        with press(model):
            out = model(input_ids=ids, past_key_values=cache)
        logits = [out.logits[0, -1].numpy().copy()]
        kept = []
        for layer, block in enumerate(model.model.layers):
            if masked:
                k = full[layer].shape[0]
                drop = getattr(block.self_attn, "masked_key_indices", None)
                gone = [set() for _ in range(k)]
                if drop is not None:
                    for head, pos in zip(drop[1].tolist(), drop[2].tolist()):
                        gone[head].add(pos)
                kept.append([sorted(set(range(t)) - gone[head]) for head in range(k)])
            else:
                kept.append(match_positions(full[layer], cache.layers[layer].keys[0].numpy()))
        tokens, error = [], None
        for step in range(DECODE):
            token = int(np.argmax(logits[-1]))
            try:
                out = model(input_ids=torch.tensor([[token]]), past_key_values=cache,
                            position_ids=torch.tensor([[t + step]]))
            except ValueError as e:  # AdaKV/KVzip's fake-key search (attention_patch.py) can give up
                error = f"kvpress decode step {step + 1}: {e}"
                break
            tokens.append(token)
            logits.append(out.logits[0, -1].numpy().copy())
    for block in model.model.layers:  # the next press starts clean
        block.self_attn.masked_key_indices = None
    return Run(kept, np.stack(logits), tokens, scores or None, budgets or None, error)


# --- ours ---------------------------------------------------------------------------------------

def kept_positions(cache) -> list[list[list[int]]]:
    """Row 0's held positions per layer and KV head, ascending (empty slots left out)."""
    return [[sorted(int(p) for p in np.asarray(pos[0, head]) if p >= 0) for head in range(pos.shape[1])]
            for pos in cache.pos]


def run_ours(params, cfg, ids: np.ndarray, method, tokens: list[int]) -> Run:
    t = ids.shape[1]
    slots = prompt_slots(cfg, t, method) + DECODE
    logits, cache = sk.prefill(params, cfg, ids, max_slots=slots, compress=method)
    kept = kept_positions(cache)
    out = [np.asarray(logits[0])]
    for token in tokens:
        logits, cache = sk.decode_step(params, cfg, np.array([token]), cache)
        out.append(np.asarray(logits[0]))
    return Run(kept, np.stack(out), tokens, None)


# --- one context, many questions: kvpress's pipeline against `context=` -----------------------------

QUESTIONS = (5, 12, 8)  # ragged question lengths asked of one context
ANSWER = 5              # greedy tokens per answer


def pipeline_cases(tok, cfg, t: int):
    """(label, press factory or None, our method or None, attention implementation) for a context of t
    tokens: the presses whose rule ours expresses exactly (the rows above), and no press."""
    n = compute_n_kept(t, 0.5)
    g = kvzip_ratio(cfg.num_layers, cfg.num_kv_heads, t, n)
    return [
        ("no press", None, None, "sdpa"),
        ("SnapKVPress(r=0.5, window_size=8, kernel_size=7)",
         lambda: kvpress.SnapKVPress(compression_ratio=0.5, window_size=8, kernel_size=7),
         sk.SnapKV(capacity=n, window=8, kernel=7, pooling="avgpool", gqa_reduce="mean"), "sdpa"),
        ("StreamingLLMPress(r=0.5, n_sink=4)", lambda: kvpress.StreamingLLMPress(compression_ratio=0.5, n_sink=4),
         sk.StreamingLLM(capacity=n, sinks=4), "sdpa"),
        ("ObservedAttentionPress(r=0.5)", lambda: kvpress.ObservedAttentionPress(compression_ratio=0.5),
         sk.H2O(capacity=n, window=0, normalize=True), "eager"),
        ("AdaKVPress(SnapKVPress(r=0.5, window_size=8, kernel_size=7), alpha=0.2)",
         lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=0.5, window_size=8, kernel_size=7),
                                    alpha_safeguard=0.2),
         sk.AdaKV(capacity=n, window=8, alpha=adakv_alpha(n, 8, 0.2), max_per_head=t - 8, kernel=7,
                  pooling="avgpool"), "sdpa"),
        (f"KVzipPress(r={g:.4f}, layerwise=False, chunk_size=64)",
         lambda: kvpress.KVzipPress(compression_ratio=g, layerwise=False, n_sink=4, chunk_size=64),
         sk.KVzip.from_tokenizer(tok, capacity=n, chunk=64, sinks=4, budget="global", max_per_head=t), "sdpa"),
    ]


def pipeline_kvpress(model, tok, context: np.ndarray, questions: list[np.ndarray], press):
    """kvpress's own pipeline (`KVPressTextGenerationPipeline._forward`: the context prefilled under the
    press, then each question and its greedy answer on that cache, the answer cut off before the next
    question). Returns (the `[steps, V]` logits of every question's answer tokens, question after question,
    read by a forward hook on the model: the pipeline prefills the context through the inner model, which
    the hook does not see; why kvpress stopped early, or None). The masking presses' decode-time fake-key
    search can give up on these tiny heads (see `run_kvpress`): the steps before that are returned."""
    pipe = kvpress.KVPressTextGenerationPipeline(model=model, tokenizer=tok)
    seen, error = [], None
    hook = model.register_forward_hook(lambda module, args, out: seen.append(out.logits[0, -1].numpy().copy()))
    try:
        with torch.no_grad():
            questions_ids = [torch.tensor(q[None]) for q in questions]
            pipe._forward(dict(context_ids=torch.tensor(context), questions_ids=questions_ids),
                          max_new_tokens=ANSWER, press=press)
    except ValueError as e:
        error = f"kvpress stopped after {len(seen)} of {len(questions) * ANSWER} answer tokens: {e}"
    finally:
        hook.remove()
        for block in model.model.layers:
            block.self_attn.masked_key_indices = None
    if error is None and len(seen) != len(questions) * ANSWER:
        raise RuntimeError(f"kvpress ran {len(seen)} forward passes for {len(questions)} x {ANSWER} tokens")
    return np.stack(seen) if seen else np.zeros((0, 0)), error


def pipeline_ours(params, cfg, context: np.ndarray, questions: list[np.ndarray], method):
    """The same with `context=`: the context prefilled (and compressed) once, the questions one ragged
    batch. Returns (generate's greedy tokens `[Q, ANSWER]`, the `[Q, ANSWER, V]` logits of extend's
    steps: the question, then each greedy token as a one-token segment)."""
    _, ctx = sk.prefill(params, cfg, context, compress=method)
    tokens = np.zeros((len(questions), max(len(q) for q in questions)), np.int32)
    for b, q in enumerate(questions):
        tokens[b, :len(q)] = q
    lengths = np.array([len(q) for q in questions])
    generated = np.asarray(sk.generate(params, cfg, tokens, lengths, context=ctx, max_new_tokens=ANSWER).tokens)
    logits, own = sk.extend(params, cfg, None, tokens, lengths, context=ctx)
    steps = [np.asarray(logits)]
    for _ in range(ANSWER - 1):
        logits, own = sk.extend(params, cfg, own, steps[-1].argmax(-1)[:, None], context=ctx)
        steps.append(np.asarray(logits))
    return generated, np.stack(steps, axis=1)


def pipeline_rows(name, tok, hf, params, cfg, t: int) -> list[dict]:
    rng = np.random.default_rng(1000 + t)
    context = rng.integers(1, VOCAB, (1, t))
    questions = [rng.integers(1, VOCAB, n) for n in QUESTIONS]
    rows = []
    for label, make, method, attn in pipeline_cases(tok, cfg, t):
        theirs, error = pipeline_kvpress(hf[attn], tok, context, questions, None if make is None else make())
        generated, steps = pipeline_ours(params, cfg, context, questions, method)
        ours = steps.reshape(-1, steps.shape[-1])[:len(theirs)]   # question after question, as kvpress ran
        answered = len(theirs) // ANSWER
        rows.append(dict(model=name, T=t, questions=list(QUESTIONS), answer_tokens=ANSWER, press=label,
                         ours="full cache" if method is None else method.describe(), note=error or "",
                         compared_tokens=len(theirs),
                         answers_equal=int(sum((generated[b] == theirs[b * ANSWER:(b + 1) * ANSWER].argmax(-1)).all()
                                               for b in range(answered))),
                         answers_compared=answered,
                         generate_equals_extend_steps=bool((generated == steps.argmax(-1)).all()),
                         max_logit_diff=float(np.abs(ours - theirs).max()) if len(theirs) else None))
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --- decode-time compression: kvpress's DecodingPress against `generate(decode_compress=)` ---------------

DEC_PROMPT, DEC_INTERVAL, DEC_TARGET, DEC_NEW = 64, 8, 32, 32   # 31 decode steps: compressions after 8, 16, 24


@dataclasses.dataclass
class SnapKVTruePositions(kvpress.SnapKVPress):
    """kvpress's SnapKVPress with the buffered window queries rotated at their own positions (the loop
    sets `position`, the current token's). Inside DecodingPress the stock press rotates all of them with
    `kwargs["position_embeddings"]`, which during decoding holds the current token's cos/sin only."""

    position: int = 0

    def compute_window_attention(self, module, hidden_states, keys, window_size, position_embeddings):
        ids = torch.arange(self.position - window_size + 1, self.position + 1)[None]
        cos, sin = module.rotary_emb(hidden_states, ids)
        return kvpress.SnapKVPress.compute_window_attention(module, hidden_states, keys, window_size, (cos, sin))


def in_position_order(press):
    """`press` (a ScorerPress) with its kept pairs gathered in ascending slot order. kvpress gathers them in
    `scores.topk` order (score-descending, ties in torch's order), which no attention notices but which
    the next decode-time compression reads as slot order: StreamingLLM's first n_sink slots, SnapKV's
    pooling neighbours. This patch isolates that from the rest of kvpress's rule."""
    def compress(module, hidden_states, keys, values, attentions, kwargs):
        if press.compression_ratio == 0:
            return keys, values
        scores = press.score(module, hidden_states, keys, values, attentions, kwargs)
        n_kept = compute_n_kept(keys.shape[2], press.compression_ratio)
        idx = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values
        idx = idx.unsqueeze(-1).expand(-1, -1, -1, module.head_dim)
        return keys.gather(2, idx).contiguous(), values.gather(2, idx).contiguous()

    press.compress = compress
    return press


def decoding_cases():
    """(label, base press factory, our method, attention implementation, note). "patched" rows change
    kvpress (`in_position_order`, `SnapKVTruePositions`) to show which of its quirks makes a difference."""
    c, w, k = DEC_TARGET, 4, 5
    snap = lambda window: sk.SnapKV(capacity=c, window=window, kernel=k, pooling="avgpool", gqa_reduce="mean")
    order = "kvpress keeps pairs in topk order, the next compression reads that as slot order"
    return [
        ("StreamingLLMPress(n_sink=4)", lambda: kvpress.StreamingLLMPress(n_sink=4),
         sk.StreamingLLM(capacity=c, sinks=4), "sdpa", order + ": its 'sinks' are then any 4 kept positions"),
        ("StreamingLLMPress(n_sink=4), patched: kept pairs in position order",
         lambda: in_position_order(kvpress.StreamingLLMPress(n_sink=4)),
         sk.StreamingLLM(capacity=c, sinks=4), "sdpa", "patched kvpress"),
        (f"SnapKVPress(window_size=1, kernel_size={k})", lambda: kvpress.SnapKVPress(window_size=1, kernel_size=k),
         snap(1), "sdpa", order + ": pooling neighbours are then score neighbours"),
        (f"SnapKVPress(window_size=1, kernel_size={k}), patched: position order",
         lambda: in_position_order(kvpress.SnapKVPress(window_size=1, kernel_size=k)), snap(1), "sdpa",
         "patched kvpress; a window of the current token only: its RoPE is right"),
        (f"SnapKVPress(window_size={w}, kernel_size={k})", lambda: kvpress.SnapKVPress(window_size=w, kernel_size=k),
         snap(w), "sdpa", "kvpress rotates all w buffered queries at the current token's position; and the order"),
        (f"SnapKVPress(window_size={w}, kernel_size={k}), patched: queries at their own positions",
         lambda: SnapKVTruePositions(window_size=w, kernel_size=k), snap(w), "sdpa",
         "patched kvpress (RoPE only): the order still differs from the second compression"),
        (f"SnapKVPress(window_size={w}, kernel_size={k}), patched: own positions and position order",
         lambda: in_position_order(SnapKVTruePositions(window_size=w, kernel_size=k)), snap(w), "sdpa",
         "patched kvpress (both)"),
        (f"SnapKVPress(window_size={w}, kernel_size={k}), eager attention",
         lambda: kvpress.SnapKVPress(window_size=w, kernel_size=k), snap(w), "eager",
         "kvpress scores with the model's attention weights of the current step: 1 query, w slots protected"),
        ("ObservedAttentionPress()", lambda: kvpress.ObservedAttentionPress(),
         sk.H2O(capacity=c, window=0, normalize=True), "eager",
         "kvpress: the current step's attention / (k_len - slot); ours accumulates every step's"),
        # PrefillDecodingPress: the prompt compressed to c by SnapKV first (our compress=), then StreamingLLM
        ("PrefillDecodingPress(SnapKVPress(r=0.5, window_size=8, kernel_size=7), "
         "DecodingPress(StreamingLLMPress(n_sink=4)))",
         lambda: kvpress.StreamingLLMPress(n_sink=4), sk.StreamingLLM(capacity=c, sinks=4), "sdpa",
         "order: the prefill's topk order already scrambles the first decode compression's sinks",
         (lambda: kvpress.SnapKVPress(compression_ratio=0.5, window_size=8, kernel_size=7),
          sk.SnapKV(capacity=compute_n_kept(DEC_PROMPT, 0.5), window=8, kernel=7, pooling="avgpool"))),
        ("PrefillDecodingPress(SnapKVPress(r=0.5, window_size=8, kernel_size=7), "
         "DecodingPress(StreamingLLMPress(n_sink=4))), patched: position order (both presses)",
         lambda: in_position_order(kvpress.StreamingLLMPress(n_sink=4)), sk.StreamingLLM(capacity=c, sinks=4), "sdpa",
         "patched kvpress",
         (lambda: in_position_order(kvpress.SnapKVPress(compression_ratio=0.5, window_size=8, kernel_size=7)),
          sk.SnapKV(capacity=compute_n_kept(DEC_PROMPT, 0.5), window=8, kernel=7, pooling="avgpool"))),
    ]


def decoding_kvpress(model, ids: np.ndarray, base, prefill=None) -> dict:
    """A greedy generation of DEC_NEW tokens under DecodingPress(base), or PrefillDecodingPress(prefill,
    DecodingPress(base)): the prompt prefilled (compressed by `prefill` if given; DecodingPress skips
    prefill), then one token per step at positions T, T+1, ... (as kvpress's pipeline decodes, with no
    question in between). Kept positions per compression (per layer, per KV head; step 0 = the prefill's),
    from matching each compression's output keys against its input keys; logits `[DEC_NEW, V]`; tokens."""
    press = kvpress.DecodingPress(base_press=base, compression_interval=DEC_INTERVAL, target_size=DEC_TARGET)
    outer = press if prefill is None else kvpress.PrefillDecodingPress(prefilling_press=prefill, decoding_press=press)
    t = ids.shape[1]
    layers = len(model.model.layers)
    kv_heads = model.config.num_key_value_heads
    pos = [np.tile(np.arange(t), (kv_heads, 1)) for _ in range(layers)]
    events: dict = {}            # decode step -> per layer kept positions
    step_now = [0]

    def tracked(original, module, hidden_states, keys, values, attentions, kwargs):
        new_keys, new_values = original(module, hidden_states, keys, values, attentions, kwargs)
        layer = module.layer_idx
        before, after = keys[0].numpy(), new_keys[0].numpy()
        assert before.shape[1] == pos[layer].shape[1], (before.shape, pos[layer].shape)
        pos[layer] = np.stack([pos[layer][head][rows] for head, rows in enumerate(match_rows(before, after))])
        events.setdefault(step_now[0], [None] * layers)[layer] = [sorted(p.tolist()) for p in pos[layer]]
        return new_keys, new_values

    press.compress = functools.partial(tracked, press.compress)
    if prefill is not None:
        prefill.compress = functools.partial(tracked, prefill.compress)
    cache = transformers.DynamicCache()
    with torch.no_grad(), outer(model):
        logits = [model(input_ids=torch.tensor(ids), past_key_values=cache).logits[0, -1].numpy().copy()]
        tokens = [int(np.argmax(logits[-1]))]
        for step in range(1, DEC_NEW):
            step_now[0] = step
            if isinstance(base, SnapKVTruePositions):
                base.position = t + step - 1
            for layer in range(layers):
                pos[layer] = np.concatenate([pos[layer], np.full((kv_heads, 1), t + step - 1)], axis=1)
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                        position_ids=torch.tensor([[t + step - 1]]))
            logits.append(out.logits[0, -1].numpy().copy())
            tokens.append(int(np.argmax(logits[-1])))
    return dict(kept=[events[s] for s in sorted(events)], steps=sorted(events), logits=np.stack(logits),
                tokens=tokens, final_len=cache.get_seq_length())


def decoding_ours(params, cfg, ids: np.ndarray, method, prefill=None) -> dict:
    """`generate(compress=prefill, decode_compress=method, interval=DEC_INTERVAL)`: its greedy tokens; the
    kept positions after compression k from the final cache of a generation of 1 + k * interval tokens
    (which ends on that compression), and after the prefill's if `prefill`; the logits by replaying its
    tokens with `decode_step` from those caches."""
    t = ids.shape[1]
    run = lambda n: sk.generate(params, cfg, ids, max_new_tokens=n, compress=prefill, decode_compress=method,
                                interval=DEC_INTERVAL)
    tokens = [int(x) for x in np.asarray(run(DEC_NEW).tokens[0])]
    logits, cache = sk.prefill(params, cfg, ids, max_slots=prompt_slots(cfg, t, prefill) + DEC_INTERVAL,
                               compress=prefill)
    out, kept = [np.asarray(logits[0])], []
    if prefill is not None:
        kept.append(kept_positions(cache))
    for step in range(1, DEC_NEW):
        if step > 1 and (step - 1) % DEC_INTERVAL == 0:     # generate compresses after step `step - 1`
            cache = run(step).cache
            kept.append(kept_positions(cache))
        logits, cache = sk.decode_step(params, cfg, np.array([tokens[step - 1]]), cache)
        out.append(np.asarray(logits[0]))
    decode_compressions = len(kept) - (prefill is not None)
    steps = ([0] if prefill is not None else []) + [DEC_INTERVAL * (k + 1) for k in range(decode_compressions)]
    return dict(kept=kept, steps=steps, logits=np.stack(out), tokens=tokens)


def decoding_quirks(model, tok) -> dict:
    """Two facts about kvpress's decode-time path, measured: (1) the shape of the cos table SnapKVPress gets
    as `kwargs["position_embeddings"]` at a decode step (one row: the current token's), from which it
    takes `cos[:, -window_size:]` for all buffered window queries; (2) in kvpress's pipeline the question's
    forward pass is a decoding step of DecodingPress (the cache is not empty, so not a prefill): layer 0's
    cache length after each forward pass of `_forward` (context DEC_PROMPT, a question of 5 tokens,
    DecodingPress(StreamingLLMPress) with compression_interval DEC_INTERVAL)."""
    rng = np.random.default_rng(2001)
    ids = rng.integers(1, VOCAB, (1, DEC_PROMPT))
    shapes = []
    base = kvpress.SnapKVPress(window_size=4, kernel_size=5)
    original = base.compute_window_attention

    def spy(module, hidden_states, keys, window_size, position_embeddings):
        shapes.append(dict(cos=list(position_embeddings[0].shape), window_hidden_states=hidden_states.shape[1]))
        return original(module, hidden_states, keys, window_size, position_embeddings)

    base.compute_window_attention = spy
    press = kvpress.DecodingPress(base_press=base, compression_interval=DEC_INTERVAL, target_size=DEC_TARGET)
    cache = transformers.DynamicCache()
    with torch.no_grad(), press(model):
        out = model(input_ids=torch.tensor(ids), past_key_values=cache)
        for step in range(DEC_INTERVAL):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache,
                        position_ids=torch.tensor([[DEC_PROMPT + step]]))
    lengths = []
    hook = model.register_forward_hook(lambda module, args, output: lengths.append(cache.get_seq_length(0)))
    pipe = kvpress.KVPressTextGenerationPipeline(model=model, tokenizer=tok)
    press = kvpress.DecodingPress(base_press=kvpress.StreamingLLMPress(n_sink=4),
                                  compression_interval=DEC_INTERVAL, target_size=DEC_TARGET)
    cache = transformers.DynamicCache()
    try:
        with torch.no_grad():
            question = torch.tensor(rng.integers(1, VOCAB, (1, 5)))
            pipe._forward(dict(context_ids=torch.tensor(ids), questions_ids=[question]),
                          max_new_tokens=DEC_INTERVAL + 2, press=press, cache=cache)
    finally:
        hook.remove()
    return dict(model_head_dim=model.config.head_dim, snapkv_window_size=4, position_embeddings_at_compression=shapes,
                pipeline_question_tokens=5, pipeline_layer0_cache_after_each_forward=lengths)


def decoding_rows(name, hf, params, cfg) -> list[dict]:
    ids = np.random.default_rng(2000).integers(1, VOCAB, (1, DEC_PROMPT))
    rows = []
    for label, make, method, attn, note, *prefill in decoding_cases():
        make_prefill, our_prefill = prefill[0] if prefill else (lambda: None, None)
        theirs = decoding_kvpress(hf[attn], ids, make(), make_prefill())
        ours = decoding_ours(params, cfg, ids, method, our_prefill)
        per = []
        for a, b in zip(ours["kept"], theirs["kept"]):
            pairs = [(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb)]
            per.append(sum(x == y for x, y in pairs))
        sets = cfg.num_layers * cfg.num_kv_heads
        diverge = next((i for i, (x, y) in enumerate(zip(ours["tokens"], theirs["tokens"])) if x != y), None)
        first = diverge if diverge is not None else len(ours["tokens"])
        rows.append(dict(model=name, T=DEC_PROMPT, interval=DEC_INTERVAL, target=DEC_TARGET, new_tokens=DEC_NEW,
                         press=label if label.startswith("PrefillDecodingPress") else f"DecodingPress({label})",
                         ours=method.describe(), attention=attn, note=note,
                         compression_steps_kvpress=theirs["steps"], compression_steps_ours=ours["steps"],
                         sets_per_compression=sets, identical_per_compression=per,
                         kvpress_final_cache=theirs["final_len"],
                         tokens_equal=int(sum(x == y for x, y in zip(ours["tokens"], theirs["tokens"]))),
                         first_token_difference=diverge,
                         replay_equals_generate=bool((ours["logits"].argmax(-1) == np.array(ours["tokens"])).all()),
                         max_logit_diff_through_first_difference=float(np.abs(ours["logits"][:first + 1]
                                                                       - theirs["logits"][:first + 1]).max()),
                         max_logit_diff=float(np.abs(ours["logits"] - theirs["logits"]).max())))
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --- the comparison -----------------------------------------------------------------------------

def compare(ours: Run, theirs: Run) -> dict:
    """Sets identical, differing sets explained by float ties, and the logits' max difference."""
    same = ties = total = 0
    worst_gap = 0.0
    for layer, (a_heads, b_heads) in enumerate(zip(ours.kept, theirs.kept)):
        for head, (a, b) in enumerate(zip(a_heads, b_heads)):
            if a is None:  # no defined expectation (pyramid_rows: a layer budget below the window)
                continue
            total += 1
            if a == b:
                same += 1
                continue
            if theirs.scores is None or len(a) != len(b):
                continue
            s = theirs.scores[layer][head]
            only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
            gap = (max(s[only_b]) - min(s[only_a])) / max(abs(s).max(), 1e-30)
            worst_gap = max(worst_gap, float(gap))
            ties += gap <= TIE
    return dict(sets=total, identical=same, ties=ties, worst_tie_gap=worst_gap, decode_steps=len(theirs.tokens),
                max_logit_diff=float(np.abs(ours.logits - theirs.logits).max()),
                kept_ours=int(sum(len(h) for layer in ours.kept for h in layer)),
                kept_kvpress=int(sum(len(h) for layer in theirs.kept for h in layer)))


def adakv_alpha(n_kept: int, window: int, alpha: float) -> float:
    """Our AdaKV alpha whose per-head prefix floor int(alpha' * (n - w)) equals kvpress's: kvpress
    guarantees max(1, int(alpha * n)) pairs per head counted with the window (whose scores are the
    highest), so max(0, that - w) prefix pairs."""
    floor = max(0, max(1, int(alpha * n_kept)) - window)
    return 0.0 if floor == 0 else (floor + 0.5) / (n_kept - window)


def kvzip_ratio(layers: int, kv_heads: int, t: int, capacity: int) -> float:
    """A compression_ratio for which KVzipPress (global budget) keeps exactly layers * K * capacity pairs."""
    total, pruned = layers * kv_heads * t, layers * kv_heads * (t - capacity)
    for nudge in (0.0, 1e-12, 1e-9):
        r = pruned / total + nudge
        if int(total * r) == pruned:
            return r
    raise RuntimeError(f"no ratio prunes exactly {pruned} of {total}")


def cases(tok, cfg, t: int):
    """(label, press factory, our method, attention implementation, masked, note) for a prompt of t
    tokens; kvpress's own `compute_n_kept` sets our capacity."""
    out = []
    for r, w, k in ((0.5, 64, 5), (0.7, 64, 5), (0.5, 8, 7)):
        if t <= w or compute_n_kept(t, r) <= w:
            continue
        n = compute_n_kept(t, r)
        snap = sk.SnapKV(capacity=n, window=w, kernel=k, pooling="avgpool", gqa_reduce="mean")
        out.append((f"SnapKVPress(r={r}, window_size={w}, kernel_size={k})",
                    lambda r=r, w=w, k=k: kvpress.SnapKVPress(compression_ratio=r, window_size=w, kernel_size=k),
                    snap, "sdpa", False, ""))
        if (r, w, k) == (0.5, 64, 5):
            out.append((f"SnapKVPress(r={r}, window_size={w}, kernel_size={k}), eager attention",
                        lambda r=r, w=w, k=k: kvpress.SnapKVPress(compression_ratio=r, window_size=w,
                                                                  kernel_size=k),
                        snap, "eager", False, "scores from the model's own attention weights"))
        out.append((f"AdaKVPress(SnapKVPress(r={r}, window_size={w}, kernel_size={k}), alpha=0.2)",
                    lambda r=r, w=w, k=k: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=r, window_size=w, kernel_size=k),
                                                               alpha_safeguard=0.2),
                    sk.AdaKV(capacity=n, window=w, alpha=adakv_alpha(n, w, 0.2), max_per_head=t - w, kernel=k,
                             pooling="avgpool"), "sdpa", True,
                    "ours with the matching setting: alpha' (kvpress's floor counts the window) and "
                    "max_per_head = T - w (kvpress caps no head)"))
        out.append((f"AdaKVPress(SnapKVPress(r={r}, window_size={w}, kernel_size={k}), alpha=0.2) "
                    f"vs AdaKV(alpha=0.2) defaults",
                    lambda r=r, w=w, k=k: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=r, window_size=w, kernel_size=k),
                                                               alpha_safeguard=0.2),
                    sk.AdaKV(capacity=n, window=w, alpha=0.2, kernel=k, pooling="avgpool"), "sdpa", True,
                    "intentional: our floor is int(alpha * (C - w)) prefix slots (Ada-KV's code), capped at "
                    "2(C - w) per head"))
    for r in (0.5, 0.75):
        n = compute_n_kept(t, r)
        out.append((f"StreamingLLMPress(r={r}, n_sink=4)",
                    lambda r=r: kvpress.StreamingLLMPress(compression_ratio=r, n_sink=4),
                    sk.StreamingLLM(capacity=n, sinks=4), "sdpa", False, ""))
        out.append((f"ObservedAttentionPress(r={r})",
                    lambda r=r: kvpress.ObservedAttentionPress(compression_ratio=r),
                    sk.H2O(capacity=n, window=0, normalize=True), "eager", False,
                    "H2O(window=0, normalize=True): kvpress protects no recent window"))
    # PyramidKV: budgets over the window (kvpress) vs over the prefix (ours); see `pyramid_rows`.
    for r, w, k, beta in ((0.5, 8, 5, 4), (0.5, 64, 5, 20)):
        if t > w and round(t * (1 - r)) > w:
            out.append((f"PyramidKVPress(r={r}, window_size={w}, kernel_size={k}, beta={beta})",
                        lambda r=r, w=w, k=k, beta=beta: kvpress.PyramidKVPress(
                            compression_ratio=r, window_size=w, kernel_size=k, beta=beta),
                        sk.PyramidKV(capacity=round(t * (1 - r)), window=w, beta=beta, kernel=k, pooling="avgpool"),
                        "sdpa", False, "pyramid"))
    chunk = 64
    n = compute_n_kept(t, 0.5)
    for plus in (False, True):
        g = kvzip_ratio(cfg.num_layers, cfg.num_kv_heads, t, n)
        out.append((f"KVzipPress(r={g:.4f}, layerwise=False, chunk_size={chunk}, plus={plus})",
                    lambda g=g, plus=plus: kvpress.KVzipPress(compression_ratio=g, layerwise=False, n_sink=4,
                                                              chunk_size=chunk, kvzip_plus_normalization=plus),
                    sk.KVzip.from_tokenizer(tok, capacity=n, chunk=chunk, sinks=4, normalize=plus, budget="global",
                                            max_per_head=t),
                    "sdpa", True, "budget='global', max_per_head=T (kvpress caps no head)"))
    out.append((f"KVzipPress(r=0.5, layerwise=True, chunk_size={chunk})",
                lambda: kvpress.KVzipPress(compression_ratio=0.5, layerwise=True, n_sink=4, chunk_size=chunk),
                sk.KVzip.from_tokenizer(tok, capacity=n, chunk=chunk, sinks=4, budget="layer"), "sdpa", True,
                "intentional: kvpress's layerwise budget is shared by a layer's KV heads, ours is per "
                "(layer, KV head)"))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", nargs="+", type=int, default=[96, 160, 256])
    parser.add_argument("--pipeline-lengths", nargs="*", type=int, default=[96, 256],
                        help="context lengths of the one-context, many-questions comparison (none: skip it)")
    parser.add_argument("--decoding", action=argparse.BooleanOptionalAction, default=True,
                        help="compare kvpress's DecodingPress with generate(decode_compress=)")
    parser.add_argument("--decoding-only", action="store_true",
                        help="run the decoding comparison alone and merge its rows into the kvpress_parity.json "
                             "already under --out (the other rows, their command and date are kept)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    transformers.utils.logging.disable_progress_bar()
    rows, pipeline, decoding, quirks = [], [], [], {}
    previous = None
    if args.decoding_only:
        with open(os.path.join(args.out, "kvpress_parity.json")) as f:
            previous = json.load(f)
        rows, pipeline = previous["rows"], previous["pipeline_rows"]
    tok = char_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            directory = build_model(name, os.path.join(tmp, name))
            hf = {attn: load_hf_torch(directory, attn) for attn in ("sdpa", "eager")}
            cfg, params = sk.load_hf(directory)
            if args.decoding or args.decoding_only:
                decoding.extend(decoding_rows(name, hf, params, cfg))
                quirks[name] = decoding_quirks(hf["sdpa"], tok)
                print(json.dumps(quirks[name]), flush=True)
            if args.decoding_only:
                continue
            for t in args.lengths:
                ids = np.random.default_rng(t).integers(1, VOCAB, (1, t))
                full = {attn: full_keys(model, torch.tensor(ids)) for attn, model in hf.items()}
                for label, make, method, attn, masked, note in cases(tok, cfg, t):
                    theirs = run_kvpress(hf[attn], torch.tensor(ids), make(), full[attn], masked)
                    if theirs.error:
                        note = f"{note}; {theirs.error}" if note else theirs.error
                    if note == "pyramid":  # kvpress's per-layer budgets, each selected as SnapKV would
                        rows.extend(pyramid_rows(name, t, label, method, params, cfg, ids, theirs))
                        continue
                    ours = run_ours(params, cfg, ids, method, theirs.tokens)
                    rows.append(dict(model=name, T=t, press=label, ours=method.describe(), note=note,
                                     **compare(ours, theirs)))
                    print(json.dumps(rows[-1]), flush=True)
            for t in args.pipeline_lengths:
                pipeline.extend(pipeline_rows(name, tok, hf, params, cfg, t))
    write(args.out, rows, pipeline, decoding, quirks, previous)


def pyramid_rows(name, t, label, method, params, cfg, ids, theirs: Run) -> list[dict]:
    """Two rows: kvpress's PyramidKV against ours at the same average budget (the schedules differ:
    PyramidKV's docstring), and against SnapKV run at each layer with kvpress's own budget for that
    layer (the selection rule inside a layer)."""
    budgets = theirs.budgets
    note = f"intentional: per-layer slots kvpress {budgets}"
    try:
        ours = run_ours(params, cfg, ids, method, theirs.tokens)
        mine = [method.slots(layer, cfg.num_layers) for layer in range(cfg.num_layers)]
        rows = [dict(model=name, T=t, press=label, ours=method.describe(), note=f"{note}, ours {mine}",
                     **compare(ours, theirs))]
    except ValueError as e:  # our schedule leaves a layer no prefix slot at this capacity
        rows = [dict(model=name, T=t, press=label, ours=method.describe(), note=f"{note}; ours refuses: {e}")]
    w, k = method.window, method.kernel
    per_layer = Run([], theirs.logits, theirs.tokens, None)
    for layer, n in enumerate(budgets):
        if n <= w:  # kvpress keeps n of the window, whose scores are all equal: only n == w is defined
            window = list(range(t - w, t)) if n == w else None
            per_layer.kept.append([window] * cfg.num_kv_heads)
            continue
        snap = sk.SnapKV(capacity=n, window=w, kernel=k, pooling="avgpool")
        per_layer.kept.append(run_ours(params, cfg, ids, snap, []).kept[layer])
    result = compare(per_layer, theirs)
    result["max_logit_diff"] = None  # a different method per layer: no single cache to decode
    rows.append(dict(model=name, T=t, press=label, ours=f"SnapKV(capacity=kvpress's layer budget, window={w}, "
                     f"kernel={k}, avgpool) per layer", note="selection inside each layer", **result))
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def write(out: str, rows: list[dict], pipeline: list[dict], decoding: list[dict], quirks: dict,
          previous: dict | None = None) -> None:
    versions = {p: metadata.version(p) for p in ("kvpress", "transformers", "torch", "jax", "flax")}
    command = ("JAX_PLATFORMS=cpu PYTHONPATH=$PWD /tmp/kvp/bin/python -m experiments.kvpress_parity "
               + " ".join(sys.argv[1:]))
    today = datetime.date.today().isoformat()
    doc = dict(command=command, date=today, device=f"CPU ({platform.machine()})", versions=versions,
               decode_steps=DECODE, tie_tolerance=TIE, rows=rows, pipeline_rows=pipeline)
    if previous is not None:  # --decoding-only: the other rows keep the run that made them
        doc = {key: previous[key] for key in ("command", "date", "device", "versions", "decode_steps",
                                              "tie_tolerance", "rows", "pipeline_rows")}
        if previous["versions"] != versions:
            raise RuntimeError(f"versions changed since the saved run: {previous['versions']} -> {versions}")
    if decoding:
        doc.update(decoding_command=command, decoding_date=today, decoding_rows=decoding, decoding_quirks=quirks)
    harness.write_json(os.path.join(out, "kvpress_parity.json"), doc)
    lines = ["| model | T | kvpress press | ours | (layer, head) sets identical | differing sets that are "
             "float ties | max logit diff (decode steps) | note |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "sets" not in row:
            lines.append(f"| {row['model']} | {row['T']} | {row['press']} | `{row['ours']}` | - | - | - | "
                         f"{row['note']} |")
            continue
        diff = "n/a" if row["max_logit_diff"] is None else f"{row['max_logit_diff']:.1e} ({row['decode_steps']})"
        differ = row["sets"] - row["identical"]
        lines.append(f"| {row['model']} | {row['T']} | {row['press']} | `{row['ours']}` | "
                     f"{row['identical']}/{row['sets']} | {row['ties']}/{differ} | {diff} | {row['note']} |")
    lines += ["", "One context, many questions: kvpress's pipeline (`KVPressTextGenerationPipeline`, questions one "
              "after the other on the compressed context) against `generate(..., context=)` (the questions one "
              "ragged batch); logits of each answer's tokens, ours from `extend(..., context=)` steps.", "",
              "| model | T | question lengths | kvpress press | ours | answers equal (of those kvpress finished) "
              "| max logit diff (answer tokens compared) | generate = extend's steps | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in pipeline:
        diff = "n/a" if row["max_logit_diff"] is None else f"{row['max_logit_diff']:.1e} ({row['compared_tokens']})"
        lines.append(f"| {row['model']} | {row['T']} | {row['questions']} | {row['press']} | `{row['ours']}` | "
                     f"{row['answers_equal']}/{row['answers_compared']} | {diff} | "
                     f"{row['generate_equals_extend_steps']} | "
                     f"{row['note']} |")
    if decoding:
        lines += ["", f"Decode-time compression: kvpress's `DecodingPress(base, compression_interval={DEC_INTERVAL}, "
                  f"target_size={DEC_TARGET})` against `generate(decode_compress=ours, interval={DEC_INTERVAL})`, "
                  f"prompt {DEC_PROMPT}, {DEC_NEW} greedy tokens (compressions after decode steps "
                  f"{DEC_INTERVAL}, {2 * DEC_INTERVAL}, {3 * DEC_INTERVAL}); kept positions after each compression, "
                  "then the tokens and the logits (ours replayed with `decode_step` from generate's caches).", "",
                  "| model | kvpress | attention | ours | (layer, head) sets identical, per compression | tokens equal "
                  "| first differing token (index) | max logit diff (up to and including that token's logits) | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in decoding:
            per = ", ".join(f"{n}/{row['sets_per_compression']}" + (" (prefill)" if step == 0 else "")
                            for step, n in zip(row["compression_steps_kvpress"], row["identical_per_compression"]))
            if row["compression_steps_kvpress"] != row["compression_steps_ours"]:
                per += (f" (steps differ: kvpress {row['compression_steps_kvpress']}, "
                        f"ours {row['compression_steps_ours']})")
            first = "-" if row["first_token_difference"] is None else row["first_token_difference"]
            lines.append(f"| {row['model']} | {row['press']} | {row['attention']} | `{row['ours']}` | {per} | "
                         f"{row['tokens_equal']}/{row['new_tokens']} | {first} | {row['max_logit_diff']:.1e} "
                         f"({row['max_logit_diff_through_first_difference']:.1e}) | {row['note']} |")
    harness.write_text(os.path.join(out, "kvpress_parity_table.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
