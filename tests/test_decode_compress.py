"""Decode-time compression (`generate(..., decode_compress=m, interval=N)`): a float64 NumPy replay of the
same greedy generation, re-selecting at the same steps, keeps the same positions and emits the same tokens;
the cache stays within capacity + interval slots over 2,000 tokens; an interval longer than the generation
changes nothing; bad knobs are refused in one line."""

import math

import jax
import numpy as np
import pytest

import snapkv_jax as sk
from snapkv_jax import cache as kv
from snapkv_jax import decode_compress, layer_prefill
from snapkv_jax.generate import bucket_width
from tests.test_snapkv_select import oracle_pool

CFG = sk.ModelConfig.tiny()
METHODS = {
    "snapkv": sk.SnapKV(window=3, capacity=14, kernel=3),
    "snapkv-avgpool": sk.SnapKV(window=4, capacity=12, kernel=5, pooling="avgpool", gqa_reduce="max"),
    "streamingllm": sk.StreamingLLM(capacity=12, sinks=2),
    "h2o": sk.H2O(capacity=14, window=3),
    "h2o-normalized": sk.H2O(capacity=14, window=3, normalize=True),
}
INTERVAL = 6


def _np(params):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)


def _rms(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + CFG.rms_norm_eps) * scale


def _rope(x, position):
    d = x.shape[-1]
    ang = position / CFG.rope_theta ** (np.arange(0, d, 2) / d)
    cos, sin = np.cos(np.concatenate([ang, ang])), np.sin(np.concatenate([ang, ang]))
    return x * cos + np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1) * sin


class Replay:
    """One row's greedy decoding in float64 NumPy from a (JAX-prefilled) cache, re-selecting every
    `interval` appended tokens as decode_compress.py defines it."""

    def __init__(self, params, cache, row, method, interval):
        self.p, self.m, self.interval = _np(params), method, interval
        self.k = [np.asarray(a[row], np.float64) for a in cache.k]               # per layer [K, S, D]
        self.v = [np.asarray(a[row], np.float64) for a in cache.v]
        self.pos = [np.asarray(a[row]).copy() for a in cache.pos]               # [K, S]
        self.write = [int(w) for w in kv.host_write_slots(cache)[:, row]]
        self.next_pos, self.since = int(cache.next_pos[row]), 0
        self.ring = [[] for _ in self.k]                                         # (position, q [H, D])
        heads, slots = CFG.num_heads, self.k[0].shape[1]
        self.acc = [np.zeros((heads, slots)) for _ in self.k]
        self.seen = [np.zeros((CFG.num_kv_heads, slots)) for _ in self.k]

    def step(self, token):
        g, d = CFG.group_size, CFG.head_dim
        x = self.p["embed"]["embedding"][token]
        for l in range(CFG.num_layers):
            a = self.p[f"layers_{l}"]
            h = _rms(x, a["attn_norm"]["scale"])
            q = _rope((h @ a["attn"]["q_proj"]["kernel"]).reshape(-1, d), self.next_pos)
            k = _rope((h @ a["attn"]["k_proj"]["kernel"]).reshape(-1, d), self.next_pos)
            v = (h @ a["attn"]["v_proj"]["kernel"]).reshape(-1, d)
            s = self.write[l]
            self.k[l][:, s], self.v[l][:, s], self.pos[l][:, s] = k, v, self.next_pos
            self.write[l] += 1
            out = np.zeros_like(q)
            probs = np.zeros(self.acc[l].shape)
            for hh in range(CFG.num_heads):
                seen = self.pos[l][hh // g] >= 0
                logits = np.where(seen, self.k[l][hh // g] @ q[hh] / math.sqrt(d), -np.inf)
                e = np.exp(logits - logits.max())
                probs[hh] = e / e.sum()
                out[hh] = probs[hh] @ self.v[l][hh // g]
            x = x + out.reshape(-1) @ a["attn"]["o_proj"]["kernel"]
            h = _rms(x, a["mlp_norm"]["scale"])
            gate, up = h @ a["mlp"]["gate_proj"]["kernel"], h @ a["mlp"]["up_proj"]["kernel"]
            x = x + (gate / (1 + np.exp(-gate)) * up) @ a["mlp"]["down_proj"]["kernel"]
            self.ring[l] = (self.ring[l] + [(self.next_pos, q)])[-max(getattr(self.m, "observation_window", 0), 1):]
            self.acc[l] += probs
            self.seen[l] += self.pos[l] >= 0
        self.next_pos += 1
        self.since += 1
        if self.since >= self.interval:
            for l in range(CFG.num_layers):
                self.reselect(l)
            self.since = 0
        return int(np.argmax(_rms(x, self.p["final_norm"]["scale"]) @ self.p["lm_head"]["kernel"]))

    def reselect(self, l):
        m, n, pos = self.m, self.write[l], self.pos[l]
        if n <= m.capacity:
            return
        kept = []
        for head in range(CFG.num_kv_heads):
            if isinstance(m, sk.StreamingLLM):
                slots = list(range(m.sinks)) + list(range(n - (m.capacity - m.sinks), n))
            else:
                w = m.window
                heads = range(head * CFG.group_size, (head + 1) * CFG.group_size)
                if isinstance(m, sk.H2O):
                    per = [self.acc[l][h, :n - w] / (np.maximum(self.seen[l][head, :n - w], 1) if m.normalize else 1)
                           for h in heads]
                else:
                    per = []
                    for h in heads:
                        total = np.zeros(n - w)
                        for qpos, q in self.ring[l]:
                            seen = (pos[head] >= 0) & (pos[head] <= qpos)
                            logits = np.where(seen, self.k[l][head] @ q[h] / math.sqrt(CFG.head_dim), -np.inf)
                            e = np.exp(logits - logits.max())
                            total += (e / e.sum())[:n - w]
                        per.append(oracle_pool(total, m.kernel, m.pooling))
                scores = np.mean(per, axis=0) if m.gqa_reduce == "mean" else np.max(per, axis=0)
                order = np.argsort(-scores, kind="stable")[:m.capacity - w]
                slots = sorted(order.tolist()) + list(range(n - w, n))
            kept.append(slots)
        for name in ("k", "v", "pos", "seen"):
            arr = getattr(self, name)[l]
            new = np.zeros_like(arr) if name != "pos" else np.full_like(arr, -1)
            for head, slots in enumerate(kept):
                new[head, :len(slots)] = arr[head, slots]
            getattr(self, name)[l] = new
        acc = np.zeros_like(self.acc[l])
        for h in range(CFG.num_heads):
            slots = kept[h // CFG.group_size]
            acc[h, :len(slots)] = self.acc[l][h, slots]
        self.acc[l] = acc
        self.write[l] = m.capacity


@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
def test_decode_compression_matches_a_numpy_replay(method):
    """Tokens equal and, after the last of three re-selections, every layer and head holds the replay's
    positions; for SnapKV and H2O also after the first and the second (shorter generations)."""
    params = sk.init_params(CFG, jax.random.key(4))
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 30)).astype(np.int32)
    lengths = np.array([30, 9], np.int32)                  # the second row starts below the capacity
    new = 3 * INTERVAL + 2
    stops = (INTERVAL + 2, 2 * INTERVAL + 2, new) if method in (METHODS["snapkv"], METHODS["h2o"]) else (new,)
    outs = {n: sk.generate(params, CFG, tokens, lengths, max_new_tokens=n, compress=method,
                           decode_compress=method, interval=INTERVAL) for n in stops}
    widths = layer_prefill.prompt_widths(CFG, bucket_width(30), method)
    for n in stops:  # the replay's cache is as wide as generate's (the same re-selection slot order)
        extra = min(bucket_width(n), decode_compress.slots_needed(CFG, widths, method, INTERVAL))
        logits, cache = sk.prefill(params, CFG, np.pad(tokens, ((0, 0), (0, 2))), lengths, compress=method,
                                   max_slots=max(widths) + extra)
        for r in range(2):
            replay = Replay(params, cache, r, method, INTERVAL)
            token, emitted = int(np.argmax(logits[r])), []
            for _ in range(n):
                emitted.append(token)
                token = replay.step(token)
            np.testing.assert_array_equal(np.asarray(outs[n].tokens[r]), emitted, err_msg=f"row {r}, {n} tokens")
            # the final cache holds every generated token but the last; the replay fed all of them
            for l in range(CFG.num_layers):
                got = np.asarray(outs[n].cache.pos[l][r])
                want = replay.pos[l].copy()
                want[want == replay.next_pos - 1] = -1
                for head in range(CFG.num_kv_heads):
                    assert sorted(got[head][got[head] >= 0]) == sorted(want[head][want[head] >= 0]), (
                        f"row {r} layer {l} head {head}, {n} tokens")


def test_cache_stays_within_capacity_plus_interval_over_2000_tokens():
    method = METHODS["snapkv"]
    params = sk.init_params(CFG, jax.random.key(4))
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 40)).astype(np.int32)
    out = sk.generate(params, CFG, tokens, [40, 7], max_new_tokens=2000, compress=method,
                      decode_compress=method, interval=16)
    assert int(out.lengths.min()) == 2000
    assert out.cache.slots == method.capacity + 16       # the static shape bounds every step
    held = np.asarray(kv.valid_slots(out.cache))
    assert held.max() <= method.capacity + 16
    assert np.asarray(out.cache.pos[0]).max() == 40 + 1998  # every token but the last was fed


@pytest.mark.parametrize("method", [METHODS["snapkv"], METHODS["h2o"]], ids=["snapkv", "h2o"])
def test_an_interval_longer_than_the_generation_changes_nothing(method):
    params = sk.init_params(CFG, jax.random.key(4))
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 30)).astype(np.int32)
    plain = sk.generate(params, CFG, tokens, [30, 9], max_new_tokens=20, compress=method)
    lazy = sk.generate(params, CFG, tokens, [30, 9], max_new_tokens=20, compress=method, decode_compress=method,
                       interval=64)
    np.testing.assert_array_equal(plain.tokens, lazy.tokens)


@pytest.mark.parametrize("kwargs, message", [
    (dict(interval=0), "interval must be a positive integer"),
    (dict(interval=2**40), "interval must be a positive integer below 2\\*\\*31, got 1099511627776"),  # not jit's OverflowError
    (dict(interval=2), "shorter than the method's window=3"),
    (dict(decode_compress="snapkv"), "compress must be None or a compression method"),
])
def test_bad_decode_compression_knobs_are_refused(kwargs, message):
    params = sk.init_params(CFG, jax.random.key(4))
    args = dict(decode_compress=METHODS["snapkv"], interval=8) | kwargs
    with pytest.raises(ValueError, match=message):
        sk.generate(params, CFG, np.zeros((1, 4), np.int32), max_new_tokens=4, **args)
