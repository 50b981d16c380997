"""Functional Llama/Mistral decoder in Flax linen: params pytree in, arrays out, no hidden state.

Mistral is Llama plus a sliding attention window. The params pytree (what the converter writes):

    embed/embedding                          [V, Dm]
    layers_{l}/attn_norm/scale               [Dm]
    layers_{l}/attn/{q,k,v,o}_proj/kernel    [Dm, H*D], [Dm, K*D], [Dm, K*D], [H*D, Dm]
    layers_{l}/mlp_norm/scale                [Dm]
    layers_{l}/mlp/{gate,up,down}_proj/kernel [Dm, F], [Dm, F], [F, Dm]
    final_norm/scale                         [Dm]
    lm_head/kernel                           [Dm, V]   (absent with tied embeddings)

`fuse_projections` gives the same model in a second layout, for speed: each layer's q/k/v kernels as one
`attn/qkv_proj/kernel [Dm, (H + 2K) D]` and gate/up as one `mlp/gate_up_proj/kernel [Dm, 2F]`, so a
decode step runs 5 weight matmuls per layer instead of 7 (on an H200 the Llama-2-7B step's matmuls alone
take 3.59 instead of 3.92 ms: experiments/results/matmul_floor_default.md). Every entry point takes
either layout and computes the same model.

Numerics follow HF transformers: RMSNorm and softmax in float32, RoPE in the split-half ("rotate_half")
layout with float32 angles, GQA by grouping query heads (query head h reads KV head h // G); K/V are never
repeated per query head, in the cache or in attention.

Layer loop: decode is unrolled over per-layer arrays, a performance requirement (DESIGN section 3:
`lax.scan` over a stacked cache copies the cache every step). Prefill is layer-major instead
(snapkv_jax/layer_prefill.py): one compiled program runs `DecoderLayer.prefill_chunk` over the prompt's
chunks for one layer and compresses that layer before the next, so only one layer ever holds the full
prompt's K/V and compile time does not grow with the layer count.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from snapkv_jax import cache as kv
from snapkv_jax.config import ModelConfig
from snapkv_jax.models.chunked_attention import chunk_attention, resolve_implementation
from snapkv_jax.models.slot_attention import SlotPart, attend_slots

_INIT = nn.initializers.normal(0.02)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """`[D/2]` float32 inverse frequencies, with llama3 or linear `rope_scaling` applied as HF does."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq.astype(np.float32)
    if s.rope_type == "linear":
        return (inv_freq / s.factor).astype(np.float32)
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotates `x [B, T, N, D]` by `positions [B, T]` in the split-half layout; returns x's dtype."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg))                                # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq              # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]        # [B, T, 1, D]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, kernel_init=_INIT, name=name)


def _fused(module: nn.Module, name: str) -> bool:
    """Whether the params bound to `module` hold the fused projection `name` (`fuse_projections`'s
    layout); never while `init` creates the params, which are in the separate layout."""
    return not module.is_initializing() and name in module.variables.get("params", {})


class Attention(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.q_proj = _dense(c.num_heads * c.head_dim, "q_proj")
        self.k_proj = _dense(c.num_kv_heads * c.head_dim, "k_proj")
        self.v_proj = _dense(c.num_kv_heads * c.head_dim, "v_proj")
        self.qkv_proj = _dense((c.num_heads + 2 * c.num_kv_heads) * c.head_dim, "qkv_proj")  # fused layout
        self.o_proj = _dense(c.hidden_size, "o_proj")

    def qkv(self, x, positions):
        """x `[B, T, Dm]`, positions `[B, T]` -> q `[B, T, H, D]`, k and v `[B, T, K, D]` (q, k rotated)."""
        c = self.cfg
        b, t, _ = x.shape
        if _fused(self, "qkv_proj"):
            q, k, v = jnp.split(self.qkv_proj(x), [c.num_heads * c.head_dim, (c.num_heads + c.num_kv_heads)
                                                   * c.head_dim], axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        return apply_rope(q, positions, c), apply_rope(k, positions, c), v

    def chunk(self, q, k_buf, v_buf, start, implementation):
        """A prompt chunk's attention against the layer's K/V buffers `[B, K, T, D]` (chunked prefill):
        q `[B, c, H, D]` at positions start .. start+c-1 -> (`[B, c, Dm]`, each query's float32
        log-sum-exp `[B, H, c]`; XLA drops it where unused)."""
        out, lse = chunk_attention(q, k_buf, v_buf, start, sliding_window=self.cfg.sliding_window,
                                   implementation=resolve_implementation(implementation, q.dtype), with_lse=True)
        return self.o_proj(out.reshape(*out.shape[:2], -1)), lse

    def decode(self, q, k_cache, v_cache, pos_cache, position, with_probs=False):
        """One query per row against the cache: q `[B, H, D]`, caches `[B, K, S, D]`/`[B, K, S]`,
        position `[B]` -> `[B, Dm]` (and, `with_probs`, the float32 attention probabilities `[B, H, S]`).
        Masks empty slots (pos < 0) and, with a sliding window W, slots with pos <= position - W."""
        c = self.cfg
        b = q.shape[0]
        q = q.reshape(b, c.num_kv_heads, c.group_size, c.head_dim)               # [B, K, G, D]
        logits = jnp.einsum("bkgd,bksd->bkgs", q, k_cache,
                            preferred_element_type=jnp.float32) / math.sqrt(c.head_dim)
        visible = pos_cache >= 0                                                 # [B, K, S]
        if c.sliding_window is not None:
            visible &= pos_cache > (position[:, None, None] - c.sliding_window)
        logits = jnp.where(visible[:, :, None, :], logits, -jnp.inf)             # [B, K, G, S]
        probs32 = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bkgs,bksd->bkgd", probs32.astype(v_cache.dtype), v_cache)  # [B, K, G, D]
        out = self.o_proj(out.reshape(b, -1))
        return (out, probs32.reshape(b, c.num_heads, -1)) if with_probs else out

    def over_slots(self, q, query_pos, parts):
        """Queries q `[B, c, H, D]` at `query_pos [B, c]` against cache slots (the row's own, and a shared
        context: models/slot_attention.py) -> `[B, c, Dm]`."""
        out = attend_slots(q, query_pos, parts, self.cfg.sliding_window)         # [B, c, H, D]
        return self.o_proj(out.reshape(*out.shape[:2], -1))


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        f = self.cfg.intermediate_size
        if _fused(self, "gate_up_proj"):
            gate, up = jnp.split(_dense(2 * f, "gate_up_proj")(x), [f], axis=-1)
        else:
            gate, up = _dense(f, "gate_proj")(x), _dense(f, "up_proj")(x)
        return _dense(self.cfg.hidden_size, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    cfg: ModelConfig

    def setup(self):
        self.attn_norm = RMSNorm(self.cfg.rms_norm_eps)
        self.attn = Attention(self.cfg)
        self.mlp_norm = RMSNorm(self.cfg.rms_norm_eps)
        self.mlp = MLP(self.cfg)

    def prompt(self, x, positions, implementation=None):
        """A whole prompt `[B, T, Dm]` at positions 0 .. T-1 -> (new x, q `[B, T, H, D]`, k, v
        `[B, T, K, D]`). `implementation` None picks cuDNN flash attention on a GPU for bf16/fp16
        (measured 636 TFLOP/s at 16K on an H100, vs 36 for XLA's, which materialises [H, T, T])."""
        q, k, v = self.attn.qkv(self.attn_norm(x), positions)
        x = x + self.attn.chunk(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), 0, implementation)[0]
        x = x + self.mlp(self.mlp_norm(x))
        return x, q, k, v

    def prefill_chunk(self, x, start, k_buf, v_buf, implementation):
        """One chunk of a layer-major prefill: x `[B, c, Dm]` holds positions start .. start+c-1. Writes
        the chunk's keys and values into the layer's buffers `[B, K, T, D]` (which hold every earlier
        position), attends, and returns (new x, q `[B, c, H, D]`, k_buf, v_buf, the attention's float32
        log-sum-exp per query `[B, H, c]`)."""
        b, c, _ = x.shape
        positions = jnp.broadcast_to(start + jnp.arange(c), (b, c))
        q, k, v = self.attn.qkv(self.attn_norm(x), positions)
        k_buf = jax.lax.dynamic_update_slice_in_dim(k_buf, k.transpose(0, 2, 1, 3).astype(k_buf.dtype),
                                                    start, axis=2)
        v_buf = jax.lax.dynamic_update_slice_in_dim(v_buf, v.transpose(0, 2, 1, 3).astype(v_buf.dtype),
                                                    start, axis=2)
        attended, lse = self.attn.chunk(q, k_buf, v_buf, start, implementation)
        x = x + attended
        x = x + self.mlp(self.mlp_norm(x))
        return x, q, k_buf, v_buf, lse

    def extend_chunk(self, x, positions, slots, k_cache, v_cache, pos_cache, context=None, from_front=False):
        """One chunk of a segment appended to a cache (`extend`): x `[B, c, Dm]` at `positions [B, c]`,
        its keys and values written into `slots [B, c]` of the layer's cache (>= S: padding, dropped)
        before it attends to every visible slot, and to the shared `context` (a SlotPart) if given;
        `from_front`: the layer is empty and the slots are 0, 1, ... (`kv.write_segment`).
        Returns (new x, q `[B, c, H, D]`, the updated layer cache arrays)."""
        q, k, v = self.attn.qkv(self.attn_norm(x), positions)
        k_cache, v_cache, pos_cache = kv.write_segment(k_cache, v_cache, pos_cache, k, v, slots, positions,
                                                       from_front=from_front)
        parts = (SlotPart(k_cache, v_cache, pos_cache),) + (() if context is None else (context,))
        x = x + self.attn.over_slots(q, positions, parts)
        x = x + self.mlp(self.mlp_norm(x))
        return x, q, k_cache, v_cache, pos_cache

    def decode(self, x, position, k_cache, v_cache, pos_cache, end, context=None, observe=False):
        """One token per row `x [B, Dm]` -> (new x, updated layer cache arrays). `context`: a shared
        SlotPart every row also attends to (merged by log-sum-exp). `observe`: also return (q `[B, H, D]`,
        the float32 attention probabilities over the layer's slots `[B, H, S]`), what decode-time
        compression keeps (no context)."""
        q, k, v = self.attn.qkv(self.attn_norm(x)[:, None], position[:, None])
        k_cache, v_cache, pos_cache = kv.append_layer(k_cache, v_cache, pos_cache, k[:, 0], v[:, 0],
                                                      end, position)
        probs = None
        if context is None:
            attended = self.attn.decode(q[:, 0], k_cache, v_cache, pos_cache, position, with_probs=observe)
            attended, probs = attended if observe else (attended, None)
            x = x + attended
        else:
            parts = (SlotPart(k_cache, v_cache, pos_cache), context)
            x = x + self.attn.over_slots(q, position[:, None], parts)[:, 0]
        x = x + self.mlp(self.mlp_norm(x))
        if observe:
            return x, k_cache, v_cache, pos_cache, (q[:, 0], probs)
        return x, k_cache, v_cache, pos_cache


class Llama(nn.Module):
    """The decoder. Entry points: `forward` (no cache), `prefill` (builds the cache, optionally SnapKV),
    `decode` (one token per row)."""

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.embed = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=_INIT, name="embed")
        self.layers = [DecoderLayer(c, name=f"layers_{i}") for i in range(c.num_layers)]
        self.final_norm = RMSNorm(c.rms_norm_eps)
        if not c.tie_word_embeddings:
            self.lm_head = _dense(c.vocab_size, "lm_head")

    def logits(self, x):
        """Final norm and LM head: `[..., Dm]` -> `[..., V]` float32."""
        x = self.final_norm(x)
        if self.cfg.tie_word_embeddings:
            return self.embed.attend(x).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)

    def forward(self, tokens, implementation=None):
        """tokens `[B, T]` -> logits `[B, T, V]`, full causal pass."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed(tokens)
        for layer in self.layers:
            x, *_ = layer.prompt(x, positions, implementation)
        return self.logits(x)

    def decode(self, tokens, cache: kv.KVCache, context: kv.KVCache | None = None, active=None,
               observe: bool = False, flash_context: bool = False, context_blocks=None):
        """tokens `[B]` -> (logits `[B, V]`, cache with one more token per row). `context`: a batch-1
        cache every row also attends to (held once). `active [B]` bool: rows that append their token
        (the others leave the cache as it was; their logits are meaningless). `observe`: also return,
        per layer, (q `[B, H, D]`, attention probabilities `[B, H, S]`) (DecoderLayer.decode).
        `flash_context`: attend to the context by cuDNN (its conditions: models/slot_attention.py);
        `context_blocks`: per layer, the context's `slot_attention.flash_blocks` for these rows, or None."""
        x = self.embed(tokens)                                                   # [B, Dm]
        ks, vs, ps, seen = [], [], [], []
        for i, (layer, k, v, pos) in enumerate(zip(self.layers, cache.k, cache.v, cache.pos)):
            write = kv.write_slots(cache, i)
            if active is not None:  # a slot past the end: the write is dropped
                write = jnp.where(active, write, k.shape[2])
            ctx = None if context is None else SlotPart(context.k[i], context.v[i], context.pos[i], shared=True,
                                                       flash=flash_context,
                                                       blocks=None if context_blocks is None else context_blocks[i])
            x, k, v, pos, *obs = layer.decode(x, cache.next_pos, k, v, pos, write, ctx, observe)
            ks.append(k), vs.append(v), ps.append(pos), seen.extend(obs)
        cache = kv.advance(cache.replace(k=tuple(ks), v=tuple(vs), pos=tuple(ps)), active)
        if observe:
            return self.logits(x), cache, tuple(seen)
        return self.logits(x), cache


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32):
    """Random params (normal, std 0.02; norm scales 1) in `dtype`, built on the default device. Compiled
    once per (cfg, dtype): a notebook or test suite drawing many models of one config traces it once.
    Raises ValueError for a `key` that is not a jax.random key, or a non-floating `dtype`."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg must be a snapkv_jax.ModelConfig, got {type(cfg).__name__}")
    if not isinstance(key, jax.Array) or not (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape == (2,)):
        raise ValueError(f"key must be a jax.random key (e.g. jax.random.key(0)), got {key!r}")
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(f"dtype must be a floating dtype (float32, bfloat16, float16), got {jnp.dtype(dtype)}")
    return _init_params(key, cfg=cfg, dtype=jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _init_params(key, *, cfg: ModelConfig, dtype):
    params = Llama(cfg).init(key, jnp.zeros((1, 1), jnp.int32), method=Llama.forward)["params"]
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), params)


def param_shapes(cfg: ModelConfig, dtype=jnp.float32, fused: bool = False):
    """The params pytree as `jax.ShapeDtypeStruct`s: what a checkpoint for `cfg` must contain (`fused`:
    the layout `fuse_projections` returns)."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype))
    return jax.eval_shape(fuse_projections, shapes) if fused else shapes


def is_fused(params) -> bool:
    """Whether the params dict is in `fuse_projections`' layout (judged by layer 0)."""
    layer = params.get("layers_0")
    return hasattr(layer, "get") and hasattr(layer.get("attn"), "keys") and "qkv_proj" in layer["attn"]


def fuse_projections(params):
    """The same model's params with each layer's q/k/v kernels concatenated (columns q, k, v) into
    `attn/qkv_proj` and gate/up into `mlp/gate_up_proj`; every other array is passed through, not copied.
    The separate kernels are not kept (drop the input to free them). Takes params in the separate
    layout (init_params, load, load_hf)."""
    if not hasattr(params, "keys") or "layers_0" not in params:
        raise ValueError(f"fuse_projections takes the params dict init_params, load or load_hf return, got "
                         f"{type(params).__name__}{'' if not hasattr(params, 'keys') else ' without layers_0'}")
    out = dict(params)
    for name in (n for n in params if n.startswith("layers_")):
        attn, mlp = dict(params[name]["attn"]), dict(params[name]["mlp"])
        if "qkv_proj" in attn or "gate_up_proj" in mlp:
            raise ValueError(f"params['{name}'] is already fused")
        attn["qkv_proj"] = {"kernel": jnp.concatenate([attn.pop(p)["kernel"] for p in ("q_proj", "k_proj",
                                                                                       "v_proj")], axis=1)}
        mlp["gate_up_proj"] = {"kernel": jnp.concatenate([mlp.pop(p)["kernel"] for p in ("gate_proj", "up_proj")],
                                                         axis=1)}
        out[name] = dict(params[name], attn=attn, mlp=mlp)
    return out
