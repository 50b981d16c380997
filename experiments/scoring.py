"""Scoring: answer matching and accuracy cells with 95% Wilson score intervals.

A sample is correct when the generated text contains every expected answer string (RULER's
"string_match_all", made binary so that a cell's accuracy is a proportion with a Wilson interval); the
partial score (the share of expected strings found) is reported beside it.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (Wilson 1927) of k successes in n trials; (0, 1) when n == 0.
    Raises ValueError unless 0 <= k <= n."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 (k = n) the bound is exactly 0 (1); computed, it can land a rounding error inside.
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def found(text: str, answers: tuple[str, ...] | list[str]) -> float:
    """The share of `answers` that occur in `text` (case-insensitive)."""
    low = text.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def cell(scores: list[float]) -> dict:
    """An accuracy cell from per-sample partial scores in [0, 1]: n, correct (samples scoring 1), acc,
    its 95% Wilson interval (lo, hi), and the mean partial score; acc and partial are None when n == 0."""
    n = len(scores)
    k = sum(s >= 1.0 for s in scores)
    lo, hi = wilson(k, n)
    return {"n": n, "correct": k, "acc": k / n if n else None, "lo": lo, "hi": hi,
            "partial": sum(scores) / n if n else None}
