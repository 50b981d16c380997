"""The model configuration: the shape and numerics of a Llama/Mistral decoder (`ModelConfig`, with its
`RopeScaling`). The compression methods, SnapKV among them, are in `snapkv_jax.compression`.

Both are hashable frozen dataclasses so they can be static arguments of `jax.jit`. This module imports
nothing of the package: it is the ground floor every other module may build on. Every value is
validated on construction, before any tracing, and a bad value raises `ValueError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any, Literal

_SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
_SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_positive_int(name: str, value) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def finite_real(value) -> bool:
    """Whether `value` is a finite real number (an int or float of any kind, not a bool). An int too large
    for a float is not: `math.isfinite` would raise OverflowError on it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_positive_real(name: str, value) -> None:
    """Raises ValueError unless `value` is a finite real number > 0 (an int or float, not a bool)."""
    if not finite_real(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling` of type "llama3" or "linear" (the only two we implement)."""

    rope_type: Literal["llama3", "linear"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("llama3", "linear"):
            raise ValueError(f"RopeScaling.rope_type must be 'llama3' or 'linear' (the ones implemented), "
                             f"got {self.rope_type!r}")
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            _check_positive_real(f"RopeScaling.{name}", getattr(self, name))
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"RopeScaling.high_freq_factor={self.high_freq_factor} must exceed "
                             f"low_freq_factor={self.low_freq_factor} (llama3 blends between them)")
        _check_positive_int("RopeScaling.original_max_position_embeddings", self.original_max_position_embeddings)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama/Mistral decoder. Mistral is Llama plus `sliding_window`.

    Invariants: `num_heads % num_kv_heads == 0`; query head h reads KV head h // (num_heads // num_kv_heads).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            _check_positive_int(f"ModelConfig.{name}", getattr(self, name))
        if self.max_position_embeddings >= 2**31:
            raise ValueError(f"ModelConfig.max_position_embeddings={self.max_position_embeddings} must be below "
                             f"2**31 (positions are int32)")
        _check_positive_real("ModelConfig.rope_theta", self.rope_theta)
        _check_positive_real("ModelConfig.rms_norm_eps", self.rms_norm_eps)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"ModelConfig.rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"ModelConfig.tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value < self.vocab_size):
                raise ValueError(f"ModelConfig.{name} must be None or a token id in [0, {self.vocab_size}), "
                                 f"got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict[str, Any]) -> ModelConfig:
        """Builds a config from a HF Llama/Mistral `config.json` (a dict, the file, or its directory).

        Raises FileNotFoundError for a missing file and ValueError for an architecture or field we do
        not implement (attention/MLP biases, unknown `rope_scaling` types, other model types).
        """
        if isinstance(path_or_dict, dict):
            hf = path_or_dict
        else:
            path = os.fspath(path_or_dict)
            if not os.path.exists(path):
                raise FileNotFoundError(f"no such file or directory: {path}")
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"no config.json at {path}")
            try:
                with open(path) as f:
                    hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
            if not isinstance(hf, dict):  # a list or a number: every field read below would fail
                raise ValueError(f"{path} must hold a JSON object (a HF config), got a {type(hf).__name__}")
        try:
            return cls(**_hf_fields(hf))
        except KeyError as e:
            raise ValueError(f"config is missing the required field {e.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict that `from_hf` reads back into an equal config."""
        hf = {
            "architectures": ["MistralForCausalLM" if self.sliding_window else "LlamaForCausalLM"],
            "model_type": "mistral" if self.sliding_window else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "sliding_window": self.sliding_window,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "rope_scaling": None,
        }
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": self.rope_scaling.rope_type, **{
                k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if k != "rope_type"}}
        return hf

    # Presets: published shapes (the HF config.json of each model).
    @classmethod
    def smollm2_135m(cls) -> ModelConfig:
        return cls(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                   num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
                   max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
                   eos_token_id=2)

    @classmethod
    def llama2_7b(cls) -> ModelConfig:
        return cls(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                   num_heads=32, num_kv_heads=32, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-5,
                   max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)

    @classmethod
    def mistral_7b(cls) -> ModelConfig:
        return cls(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                   num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-5,
                   max_position_embeddings=32768, sliding_window=4096, bos_token_id=1, eos_token_id=2)

    @classmethod
    def tiny(cls, **overrides) -> ModelConfig:
        """A few-KB model for tests: 2 layers, GQA 4/2, head_dim 16."""
        fields = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=2048)
        fields.update(overrides)
        return cls(**fields)


def _hf_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Maps a HF config dict to ModelConfig fields, rejecting what we do not implement."""
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list):  # a string would be read letter by letter
        raise ValueError(f"config field architectures must be a list of names, got {architectures!r}")
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type={model_type!r} (architectures={architectures}); "
                         f"snapkv-jax implements {_SUPPORTED_MODEL_TYPES}")
    for arch in architectures:
        if arch not in _SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {_SUPPORTED_ARCHITECTURES}")
    for flag in ("attention_bias", "mlp_bias"):
        # transformers' Mistral has no biases and ignores attention_bias; its Llama builds them
        if hf.get(flag) and not (model_type == "mistral" and flag == "attention_bias"):
            raise ValueError(f"unsupported config field {flag}={hf[flag]!r}: biases are not implemented")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers' ACT2FN maps both to SiLU
        raise ValueError(f"unsupported hidden_act={act!r}; only 'silu' (SwiGLU) is implemented")
    num_heads = hf["num_attention_heads"]
    for field in ("num_key_value_heads", "head_dim"):  # absent or null: derived below; 0 is no default
        if hf.get(field) is not None and not (_is_int(hf[field]) and hf[field] > 0):
            raise ValueError(f"config field {field} must be a positive integer or absent, got {hf[field]!r}")
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):  # bool("false") is True
        raise ValueError(f"config field tie_word_embeddings must be true or false, got {tie!r}")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    # transformers' precedence (modeling_rope_utils, >= 5): rope_scaling, else rope_parameters; the dict's
    # own rope_theta, else the top-level one, else 10000.
    rope = hf.get("rope_scaling") or hf.get("rope_parameters")
    rope_theta = hf.get("rope_theta")
    if isinstance(rope, dict) and rope.get("rope_theta") is not None:
        rope_theta = rope["rope_theta"]
    # the llama's defaults and the Mistral's (transformers' LlamaConfig / MistralConfig)
    max_positions = hf.get("max_position_embeddings", 131072 if model_type == "mistral" else 2048)
    scaling = _rope_scaling(rope, hf.get("original_max_position_embeddings"), max_positions)
    partial = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    partial = hf.get("partial_rotary_factor") if partial is None else partial
    if partial not in (None, 1, 1.0) and scaling is not None:
        # transformers' Llama ignores it with the default rope and fails with the scaled ones
        raise ValueError(f"unsupported config field partial_rotary_factor={partial!r} with rope type "
                         f"{scaling.rope_type!r}: partial rotary embeddings are not implemented")
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        # transformers' MistralConfig defaults the window to 4096 when config.json has no such key
        sliding_window=hf.get("sliding_window", 4096) if model_type == "mistral" else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
    )


def _rope_scaling(scaling: dict[str, Any] | None, original_max: int | None,
                  max_positions: int) -> RopeScaling | None:
    """The RopeScaling of a config's rope dict; llama3's original context length as transformers takes
    it: a top-level `original_max_position_embeddings` first, then the dict's, then
    `max_position_embeddings`."""
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"config field rope_scaling must be a JSON object or null, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {_SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return None
    if rope_type == "linear":
        return RopeScaling("linear", float(scaling["factor"]))
    if original_max is None:
        original_max = scaling.get("original_max_position_embeddings", max_positions)
    return RopeScaling("llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
                       float(scaling["high_freq_factor"]), int(original_max))
