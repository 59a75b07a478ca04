"""Evaluation figures: the joint t-SNE figure of prior, posterior and limiting-chain codes (METHOD §13.3, #20),
and small-multiple line plots (FD and gap against the training step, `symeq compare`).

Draws on matplotlib's Agg canvas directly (no pyplot state, no backend switch); must not import tensorboard
or deepspeed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

DPI = 100


def _subsample(codes: dict[str, np.ndarray], labels: dict[str, np.ndarray | None], max_points: int,
               seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None]]:
    """At most `max_points` rows of each set, flattened to (n, d) float64; the same rows of its labels."""
    if not codes:
        raise ValueError("tsne_figure needs at least one code set, e.g. {'prior': ..., 'posterior': ...}")
    rng = np.random.default_rng(seed)
    points: dict[str, np.ndarray] = {}
    point_labels: dict[str, np.ndarray | None] = {}
    for name, raw in codes.items():
        x = np.asarray(raw, dtype=np.float64)
        x = x.reshape(len(x), -1)
        y = labels.get(name)
        if y is not None and len(np.asarray(y)) != len(x):
            raise ValueError(f"labels['{name}'] has {len(np.asarray(y))} entries for {len(x)} codes; pass one per code")
        keep = np.sort(rng.choice(len(x), max_points, replace=False)) if len(x) > max_points else np.arange(len(x))
        points[name] = x[keep]
        point_labels[name] = None if y is None else np.asarray(y).reshape(-1)[keep].astype(np.int64)
    widths = {name: x.shape[1] for name, x in points.items()}
    if len(set(widths.values())) != 1:
        raise ValueError(f"all code sets must have the same width for a joint embedding, got {widths}")
    return points, point_labels


def _embed(x: np.ndarray, perplexity: float, seed: int, num_threads: int) -> np.ndarray:
    """Joint 2-d t-SNE embedding (PCA init, fixed seed), shape (n, 2)."""
    # lazy: scikit-learn is slow to import and only the figure needs it
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    if not 0 < perplexity < len(x):
        raise ValueError(f"perplexity must lie in (0, {len(x)}) for {len(x)} points, got {perplexity}; "
                         "lower it or embed more points")
    # Bounded OpenMP/BLAS threads: next to torch's own OpenMP pool, sklearn's Barnes-Hut threads oversubscribe
    # the cores (measured 6-30 s instead of 1 s for 180 points on a busy 2-core machine).
    with threadpool_limits(limits=num_threads):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def _marker_size(num_points: int) -> float:
    """Area in pt²: readable dots for a few hundred points, small enough for 5,000 per panel."""
    return float(np.clip(3000.0 / max(num_points, 1), 2.0, 12.0))


def _scatter_labels(ax: Axes, xy: np.ndarray, y: np.ndarray | None, legend: bool) -> None:
    """Points coloured by class (tab10, or tab20 above 10 classes), grey without labels."""
    size = _marker_size(len(xy))
    if y is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, color="0.55", linewidths=0, alpha=0.6)
        return
    top = int(y.max(initial=0))
    cmap = colormaps["tab10" if top < 10 else "tab20"]
    for k in np.unique(y):
        mask = y == k
        ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=cmap(int(k) % cmap.N), linewidths=0, alpha=0.7,
                   label=str(k))
    if legend and top < 20:
        ax.legend(markerscale=2, fontsize=6, ncol=2, loc="upper right", title="class", title_fontsize=6)


def _tsne_panels(xy: dict[str, np.ndarray], labels: dict[str, np.ndarray | None], title: str) -> Figure:
    """First panel: all sets overlaid, coloured by set; then one panel per set, coloured by class label."""
    ncols = 1 + len(xy)
    fig = Figure(figsize=(3.4 * ncols, 3.7), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    set_colors = colormaps["tab10"]
    size = _marker_size(sum(len(points) for points in xy.values()))
    for i, (name, points) in enumerate(xy.items()):
        axes[0].scatter(points[:, 0], points[:, 1], s=size, color=set_colors(i % 10), linewidths=0, alpha=0.5,
                        label=name)
    axes[0].legend(markerscale=2, fontsize=7, loc="upper right")
    axes[0].set_title("all sets (colour: set)", fontsize=9)
    legend_pending = True
    for ax, (name, points) in zip(axes[1:], xy.items(), strict=True):
        y = labels.get(name)
        _scatter_labels(ax, points, y, legend=legend_pending and y is not None)
        legend_pending = legend_pending and y is None
        ax.set_title(f"{name} ({len(points)} points{', colour: class' if y is not None else ''})", fontsize=9)
    everything = np.concatenate(list(xy.values()))
    low, high = everything.min(0), everything.max(0)
    margin = 0.05 * np.maximum(high - low, 1e-9)
    for ax in axes:
        ax.set_xlim(low[0] - margin[0], high[0] + margin[0])
        ax.set_ylim(low[1] - margin[1], high[1] + margin[1])
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, out_png: Path) -> np.ndarray:
    """Render, write the PNG atomically and return the pixels as uint8 (H, W, 3)."""
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, out_png)
    fig.clear()
    return image


def tsne_figure(codes: dict[str, np.ndarray], labels: dict[str, np.ndarray | None], out_png: Path, *, seed: int = 0,
                perplexity: float = 30.0, max_points_per_set: int = 5000, title: str = "",
                num_threads: int = 1) -> np.ndarray:
    """Joint t-SNE of code sets (e.g. "prior", "posterior", "limiting"), METHOD §13.3 and decision #20.

    Each set is subsampled to `max_points_per_set` rows (np.random.default_rng(seed)), all sets are embedded
    together (sklearn TSNE, PCA init, random_state=seed), and drawn as one overlay panel coloured by set plus one
    panel per set (same axes limits) coloured by class when `labels[set]` is given (grey otherwise).
    Posterior and limiting codes overlapping the prior codes indicate a consistent pair.

    Args:
        codes: set name -> codes, shape (n, d) (more dims are flattened); all sets share d.
        labels: set name -> class labels, shape (n,), or None (a missing key means None).
        out_png: where the PNG (dpi 100) is written; parent directories are created.
        num_threads: OpenMP/BLAS threads for the embedding; 1 (default) is immune to oversubscription next to
            torch and makes the figure independent of the core count; raise it on an idle many-core node
            (about 60 s single-threaded for 3 x 2,000 points).

    Returns:
        The rendered figure as uint8 (H, W, 3), e.g. for TensorBoard's add_image(..., dataformats="HWC").
    """
    points, point_labels = _subsample(codes, labels, max_points_per_set, seed)
    embedded = _embed(np.concatenate(list(points.values())), perplexity, seed, num_threads)
    bounds = np.cumsum([len(x) for x in points.values()])[:-1]
    xy = dict(zip(points, np.split(embedded, bounds), strict=True))
    return save_figure(_tsne_panels(xy, point_labels, title), out_png)


Series = dict[str, tuple[list[float], list[float]]]
"""Line label -> (x values, y values)."""


def curves_figure(panels: list[tuple[str, Series]], out_png: Path, *, ncols: int, xlabel: str, ylabel: str,
                  title: str = "") -> np.ndarray:
    """Small multiples: one panel per (title, series), one line with markers per label (the same colour for the
    same label in every panel), a shared legend in the first free cell (or the first panel).

    The x axis is logarithmic when every x value is positive and they span a factor of 10 or more (training
    lengths such as 3k, 10k, 30k). Missing points are NaN (a gap in the line).

    Returns:
        The rendered figure as uint8 (H, W, 3).
    """
    if not panels:
        raise ValueError("curves_figure needs at least one panel")
    labels = list(dict.fromkeys(label for _, series in panels for label in series))
    colors = {label: colormaps["tab10"](i % 10) for i, label in enumerate(labels)}
    xs = [x for _, series in panels for values, _ in series.values() for x in values]
    log_x = bool(xs) and min(xs) > 0 and max(xs) >= 10 * min(xs)
    nrows = -(-(len(panels) + 1) // ncols)  # one more cell for the legend
    fig = Figure(figsize=(3.2 * ncols, 2.7 * nrows), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    for ax, (name, series) in zip(axes, panels, strict=False):
        for label, (x, y) in series.items():
            ax.plot(x, y, marker="o", markersize=3, linewidth=1.2, color=colors[label], label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    free = axes[len(panels):]
    for ax in free:
        ax.axis("off")
    handles = [Line2D([], [], color=colors[label], marker="o", markersize=3) for label in labels]
    (free[0] if len(free) else axes[0]).legend(handles, labels, fontsize=8, loc="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png)
