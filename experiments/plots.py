"""Plot helpers on matplotlib's object API (`Figure`, no pyplot): no global backend is switched, so
importing this module changes nothing in a notebook, and figures render to PNG with the Agg canvas."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
from matplotlib.figure import Figure


def grid(n: int, *, cols: int = 3, size: tuple[float, float] = (4.6, 3.4), **subplot_kw):
    """(Figure, flat list of n axes) laid out in rows of at most `cols`; unused cells are hidden."""
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **subplot_kw).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def accuracy_line(ax, x, cells: list[dict], label: str, **kw) -> None:
    """Accuracy of `cells` (scoring.cell dicts) at `x`, with their Wilson intervals as error bars."""
    acc = np.array([c["acc"] for c in cells])
    err = np.array([[c["acc"] - c["lo"] for c in cells], [c["hi"] - c["acc"] for c in cells]])
    ax.errorbar(x, acc, yerr=err, marker="o", capsize=3, label=label, **kw)


def accuracy_bars(ax, x, cells: list[dict], width: float, label: str) -> None:
    """Bars of `cells`' accuracies at `x` with their Wilson intervals as error bars."""
    acc = np.array([c["acc"] for c in cells])
    err = np.array([[c["acc"] - c["lo"] for c in cells], [c["hi"] - c["acc"] for c in cells]])
    ax.bar(x, acc, width, yerr=err, capsize=2, label=label)


def accuracy_band(ax, cell: dict, label: str, color: str = "black") -> None:
    """A horizontal line at one cell's accuracy with its Wilson interval shaded (e.g. the full cache)."""
    ax.axhline(cell["acc"], color=color, linestyle="--", label=label)
    ax.axhspan(cell["lo"], cell["hi"], color=color, alpha=0.08)


def layer_color(layer: int, layers: int):
    """A colour from dark (first layer) to light (last), for one line per layer."""
    return matplotlib.colormaps["viridis"](layer / max(1, layers - 1))


def heatmap(ax, values: np.ndarray, row_labels, col_labels, title: str, *, vmin=0.0, vmax=1.0):
    """`values [rows, cols]` as a red-to-green map with each cell's value written in it; returns the image
    (for a colorbar)."""
    im = ax.imshow(values, cmap="RdYlGn", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            text = "1" if v >= 1 else "0" if v <= 0 else f"{v:.2f}".lstrip("0")
            ax.text(c, r, text, ha="center", va="center", fontsize=7)
    ax.set_title(title, fontsize=10)
    return im
