"""Plots the notebooks share. Each function takes data and draws on a matplotlib Axes.

Every function accepts an optional ``ax`` (a new figure is made when it is None)
and returns the Axes it drew on, so a notebook can combine them in subplots and
finish the cell with ``plt.show()``. Inputs may be torch tensors, numpy arrays or
lists; nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "plot_expert_load",
    "plot_expert_counts",
    "plot_routing_heatmap",
    "plot_drop_rate",
    "plot_loss_curves",
    "plot_routed_text",
]


def _array(name: str, v, ndim: int) -> np.ndarray:
    a = np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, dtype=float)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {a.shape}")
    return a


def _axes(ax, figsize=(6, 3.5)):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_expert_load(load, steps=None, ax=None, title: str = "expert load", normalize: bool = True):
    """Per-expert load over training: one line per expert.

    load:  [S, E] tokens (or assignments) per expert at S logged steps
    steps: [S] step numbers (default 0..S-1)
    normalize: plot the share of tokens (rows sum to 1) with the uniform share 1/E dashed
    """
    a = _array("load", load, 2)
    S, E = a.shape
    x = np.arange(S) if steps is None else _array("steps", steps, 1)
    if x.shape[0] != S:
        raise ValueError(f"steps must have S={S} entries like load, got {x.shape[0]}")
    if normalize:
        a = a / np.maximum(a.sum(axis=1, keepdims=True), 1e-12)
    ax = _axes(ax)
    colors = _expert_colors(E)
    for e in range(E):
        ax.plot(x, a[:, e], color=colors[e], lw=1.5, label=f"expert {e}")
    if normalize:
        ax.axhline(1.0 / E, color="k", ls="--", lw=1, label="uniform 1/E")
        ax.set_ylabel("share of tokens")
    else:
        ax.set_ylabel("tokens")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    return ax


def plot_expert_counts(counts, ax=None, expected: float | None = None, title: str = "tokens per expert"):
    """Bar chart of one routing histogram: counts: [E]; ``expected`` draws the balanced level."""
    c = _array("counts", counts, 1)
    ax = _axes(ax)
    ax.bar(np.arange(c.shape[0]), c, color=_expert_colors(c.shape[0]))
    if expected is not None:
        ax.axhline(expected, color="k", ls="--", lw=1, label="balanced")
        ax.legend(loc="lower right")
    ax.set_xticks(range(c.shape[0]))
    ax.set_xlabel("expert")
    ax.set_ylabel("tokens")
    ax.set_title(title)
    return ax


def plot_routing_heatmap(
    matrix, ax=None, row_labels: Sequence[str] | None = None, title: str = "routing", cmap: str = "viridis",
    annotate: bool = False, colorbar: bool = True,
):
    """Heatmap of a [R, E] matrix (router probabilities per token, or usage per domain).

    Rows are tokens / groups, columns experts. ``annotate`` writes each value (small R, E).
    """
    m = _array("matrix", matrix, 2)
    R, E = m.shape
    if row_labels is not None and len(row_labels) != R:
        raise ValueError(f"row_labels must have R={R} entries, got {len(row_labels)}")
    ax = _axes(ax, figsize=(0.5 * E + 2, 0.3 * R + 1.5))
    im = ax.imshow(m, aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_xticks(range(E))
    ax.set_xlabel("expert")
    if row_labels is not None:
        ax.set_yticks(range(R))
        ax.set_yticklabels(row_labels)
    if annotate:
        mid = (np.nanmax(m) + np.nanmin(m)) / 2
        for r in range(R):
            for e in range(E):
                ax.text(e, r, f"{m[r, e]:.2f}", ha="center", va="center", fontsize=9,
                        color="k" if m[r, e] > mid else "w")
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title)
    return ax


def plot_drop_rate(capacity_factors, drop_rates: Mapping[str, Sequence[float]], ax=None, title: str = "dropped tokens"):
    """Drop rate against capacity factor, one curve per setting (e.g. group size).

    capacity_factors: [N] x values; drop_rates: {label: [N] fractions in [0, 1]}
    """
    x = _array("capacity_factors", capacity_factors, 1)
    ax = _axes(ax)
    for label, rates in drop_rates.items():
        y = _array(f"drop_rates[{label!r}]", rates, 1)
        if y.shape != x.shape:
            raise ValueError(f"drop_rates[{label!r}] must have {x.shape[0]} entries, got {y.shape[0]}")
        ax.plot(x, 100 * y, marker="o", ms=3, label=str(label))
    ax.set_xlabel("capacity factor")
    ax.set_ylabel("tokens dropped (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return ax


def plot_loss_curves(curves: Mapping[str, Sequence[float]], steps=None, ax=None, title: str = "loss",
                     smooth: int = 1, logy: bool = False):
    """Training curves: ``{label: [S] values}``; ``smooth`` > 1 applies a running mean."""
    ax = _axes(ax)
    for label, values in curves.items():
        y = _array(f"curves[{label!r}]", values, 1)
        if smooth > 1 and y.shape[0] >= smooth:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
        x = np.arange(y.shape[0]) if steps is None else _array("steps", steps, 1)[-y.shape[0]:]
        ax.plot(x, y, lw=1.5, label=str(label))
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return ax


def _expert_colors(E: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if E <= 10 else "tab20"]
    return [cmap(e % cmap.N) for e in range(E)]


def plot_routed_text(ids, experts, num_experts: int, ax=None, width: int = 32, title: str = "routed bytes",
                     legend: bool = True):
    """Bytes drawn on a grid, each cell coloured by the expert its token went to (the
    Mixtral paper's figure of routed tokens, for a byte-level model).

    ids: [T] byte ids; experts: [T] expert of each byte; ``width`` bytes per row. Spaces
    are drawn as ``·`` and newlines as ``↵``; bytes outside printable ASCII as ``?``.
    ``legend`` names the colour of each expert that appears, under the grid.
    """
    b = _array("ids", ids, 1).astype(int)
    e = _array("experts", experts, 1).astype(int)
    if b.shape != e.shape:
        raise ValueError(f"ids and experts must have the same length, got {b.shape[0]} and {e.shape[0]}")
    if num_experts < 1 or (e.size and (e.min() < 0 or e.max() >= num_experts)):
        raise ValueError(f"experts must hold expert ids in [0, {num_experts - 1}]")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    rows = -(-b.shape[0] // width)
    ax = _axes(ax, figsize=(0.28 * width + 1, 0.4 * rows + 0.8))
    colors = _expert_colors(num_experts)
    grid = np.ones((rows, width, 4))
    for t, (byte, ex) in enumerate(zip(b, e)):
        r, c = divmod(t, width)
        grid[r, c] = colors[ex]
        ch = "·" if byte == 32 else "↵" if byte == 10 else chr(byte) if 33 <= byte <= 126 else "?"
        ax.text(c, r, ch, ha="center", va="center", fontsize=9, family="monospace")
    ax.imshow(grid, aspect="auto", interpolation="nearest", alpha=0.55)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    if legend:
        from matplotlib.patches import Patch

        used = sorted(set(e.tolist()))
        handles = [Patch(color=colors[x], alpha=0.55, label=f"expert {x}") for x in used]
        ax.legend(handles=handles, ncol=min(len(used), 8), fontsize=9, loc="upper center",
                  bbox_to_anchor=(0.5, 0.0), frameon=False)
    return ax
