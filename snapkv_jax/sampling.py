"""Sampling strategies: how the next token is drawn from a row's logits, as small frozen dataclasses.

Each strategy is validated when it is built (a one-line `ValueError` naming the bad value) and maps onto
the sampling keywords of `generate` (`temperature`, `top_k`, `top_p`) through `as_kwargs()`, so a
strategy and the keywords it maps to draw the same tokens for the same seed:

| strategy | draws | `generate` keywords |
| --- | --- | --- |
| `Greedy()` | the argmax | `temperature=0` |
| `Temperature(t)` | from softmax(logits / t) | `temperature=t` |
| `TopK(k, temperature=1.0, top_p=1.0)` | from the k most likely tokens (and, with top_p < 1, the nucleus among them) | `temperature=t, top_k=k, top_p=p` |
| `TopP(p, temperature=1.0)` | from the fewest most likely tokens holding mass p (nucleus) | `temperature=t, top_p=p` |

The draw itself is `generate.sample`. Whether `k` fits the vocabulary is checked by `generate` (it knows
the model).
"""

from __future__ import annotations

import dataclasses
import numbers

from snapkv_jax.config import finite_real

__all__ = ["Greedy", "Strategy", "Temperature", "TopK", "TopP", "check_strategy", "from_kwargs"]


def _check_temperature(owner: str, t) -> None:
    if not finite_real(t) or t <= 0:
        raise ValueError(f"{owner}: temperature must be a finite number > 0, got {t!r} (sk.Greedy() for argmax)")


class Strategy:
    """Base of the sampling strategies; `as_kwargs()` gives `generate`'s keywords for it."""

    def as_kwargs(self) -> dict:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Greedy(Strategy):
    """The most likely token every step: deterministic, the seed is unused."""

    def as_kwargs(self) -> dict:
        return dict(temperature=0.0, top_k=0, top_p=1.0)


@dataclasses.dataclass(frozen=True)
class Temperature(Strategy):
    """A draw from softmax(logits / temperature) over the whole vocabulary; temperature > 0."""

    temperature: float

    def __post_init__(self):
        _check_temperature("Temperature", self.temperature)

    def as_kwargs(self) -> dict:
        return dict(temperature=float(self.temperature), top_k=0, top_p=1.0)


@dataclasses.dataclass(frozen=True)
class TopK(Strategy):
    """A draw from softmax(logits / temperature) restricted to the `k` largest logits and any tied with
    the k-th; k >= 1 (`TopK(1, t)` is greedy unless the maximum is tied: it then draws among the tied,
    where `Greedy` takes the lowest index). `top_p` < 1 restricts it further to the nucleus of those k (as
    `generate`'s `top_k` with `top_p` does); 0 < top_p <= 1."""

    k: int
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral) or self.k < 1:
            raise ValueError(f"TopK: k must be an integer >= 1, got {self.k!r}")
        _check_temperature("TopK", self.temperature)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, numbers.Real) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"TopK: top_p must be a number in (0, 1], got {self.top_p!r}")

    def as_kwargs(self) -> dict:
        return dict(temperature=float(self.temperature), top_k=int(self.k), top_p=float(self.top_p))


@dataclasses.dataclass(frozen=True)
class TopP(Strategy):
    """Nucleus sampling (Holtzman et al., arXiv 1904.09751): a draw from softmax(logits / temperature)
    restricted to the smallest set of most likely tokens whose probability reaches `p` (and any tied with
    the last of them); 0 < p <= 1."""

    p: float
    temperature: float = 1.0

    def __post_init__(self):
        if isinstance(self.p, bool) or not isinstance(self.p, numbers.Real) or not 0.0 < self.p <= 1.0:
            raise ValueError(f"TopP: p must be a number in (0, 1], got {self.p!r}")
        _check_temperature("TopP", self.temperature)

    def as_kwargs(self) -> dict:
        return dict(temperature=float(self.temperature), top_k=0, top_p=float(self.p))


def check_strategy(sampling) -> Strategy:
    """Returns `sampling` if it is a strategy; raises ValueError naming its type otherwise."""
    if not isinstance(sampling, Strategy):
        raise ValueError(f"sampling must be sk.Greedy(), sk.Temperature(t), sk.TopK(k, t) or sk.TopP(p, t), "
                         f"got {sampling!r}")
    return sampling


def from_kwargs(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Strategy:
    """The strategy `generate`'s keywords describe (the CLI's flags): temperature 0 is `Greedy()`
    whatever the others; `top_k` with `top_p` is `TopK(top_k, temperature, top_p)`."""
    if temperature == 0:
        return Greedy()
    if top_k:
        return TopK(top_k, temperature, top_p)
    if top_p < 1.0:
        return TopP(top_p, temperature)
    return Temperature(temperature)
