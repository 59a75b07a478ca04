"""Evaluation figures and reports: the joint t-SNE figure, report.json / report.md, and the comparison of runs.

Owns rendering only (METHOD §13, decision #20); the numbers come from `symeq_dist.evaluate`. Draws on
matplotlib's Agg canvas directly (no pyplot state, no backend switch); must not import tensorboard or deepspeed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FD_SETS = ("random_code", "limiting_chain", "reconstruction")
ACTIVE_MI = 0.01  # nats: a latent dimension with MI below this is inactive (collapsed), METHOD §13.3
DPI = 100
COMPARABILITY = "FD numbers are comparable only at equal feature network, reference set and n (METHOD §13.2)"


# ---------------------------------------------------------------------------------------------------------------
# t-SNE figure
# ---------------------------------------------------------------------------------------------------------------

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


def _save_figure(fig: Figure, out_png: Path) -> np.ndarray:
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
    return _save_figure(_tsne_panels(xy, point_labels, title), out_png)


# ---------------------------------------------------------------------------------------------------------------
# report.json / report.md
# ---------------------------------------------------------------------------------------------------------------

def _num(value: Any, digits: int = 4) -> str:
    """A table cell: floats with `digits` decimals, ints as they are, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or isinstance(value, int | np.integer):
        return str(value)
    value = float(value)
    return str(value) if not math.isfinite(value) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    """numpy scalars/arrays and paths, which evaluation code may leave in the results, as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"report results must be JSON-serialisable; convert {type(value).__name__} to float/int/str")


def _md_header(results: dict[str, Any]) -> list[str]:
    lines = [f"# symeq evaluation: {Path(str(results.get('run_dir', '?'))).name}", "",
             f"- run_dir: `{results.get('run_dir')}`", f"- checkpoint step: {results.get('step')}",
             f"- seed: {results.get('seed')}", f"- n (samples per set): {results.get('n')}",
             f"- limiting-chain steps: {results.get('chain_steps', 'n/a')}"]
    lines += [f"- {key}: {results[key]}" for key in ("game", "model") if key in results]
    reference = results.get("reference")
    if isinstance(reference, dict):
        lines.append(f"- reference set: split `{reference.get('split')}`, n = {reference.get('n')}"
                     + (f" ({reference['note']})" if reference.get("note") else ""))
    return [*lines, ""]


def _md_fd(results: dict[str, Any]) -> list[str]:
    fd: dict[str, dict[str, float]] = results.get("fd", {})
    gap: dict[str, float] = results.get("consistency_gap", {})
    networks = list(fd)
    lines = ["## Fréchet distances", "", f"Each set against the reference features; {COMPARABILITY}.", ""]
    if networks:
        rows = [[name, *(_num(fd[net].get(name)) for net in networks)] for name in FD_SETS]
        rows.append(["**consistency gap** (limiting − random)", *(_num(gap.get(net)) for net in networks)])
        lines += [*_table(["set", *networks], rows), ""]
    else:
        lines += ["No Fréchet distances were computed.", ""]
    info: dict[str, dict[str, Any]] = results.get("fd_networks", {})
    if info:
        rows = [[net, str(meta.get("kind", "n/a")), f"`{str(meta.get('sha256') or 'n/a')[:16]}`",
                 _num(meta.get("valid_accuracy"))] for net, meta in info.items()]
        lines += [*_table(["network", "kind", "sha256 (first 16)", "valid accuracy"], rows), ""]
    if results.get("fid_skipped"):
        lines += [f"> FID skipped: {results['fid_skipped']}", ""]
    return lines


def _md_mi(results: dict[str, Any]) -> list[str]:
    mi: dict[str, dict[str, dict[str, Any]]] = results.get("mi", {})
    rows = [[player, factor, _num(row.get("mean")), str(row.get("active", "n/a")), str(row.get("dims", "n/a"))]
            for player, factors in mi.items() for factor, row in factors.items()]
    if not rows:
        return []
    return ["## Latent mutual information (nats)", "",
            *_table(["player", "factor", "mean MI", f"active (MI ≥ {ACTIVE_MI})", "dims"], rows), ""]


def _md_scalars(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    recon = results.get("reconstruction_error")
    if recon:
        lines += ["## Reconstruction error", "", f"{recon.get('metric', 'error')}: {_num(recon.get('value'))}", ""]
    probe = results.get("probe")
    if probe:
        lines += ["## Linear probe", "",
                  f"Test accuracy {_num(probe.get('accuracy'))} of a logistic regression on `{probe.get('latent')}` "
                  f"codes ({probe.get('num_train')} train / {probe.get('num_test')} test).", ""]
    figures: dict[str, str] = results.get("figures", {})
    if figures:
        lines += ["## Figures", ""]
        lines += [f"- [{name}]({path})\n\n  ![{name}]({path})" for name, path in figures.items()] + [""]
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """The readable report.md text of one evaluation (layout: see `write_report`)."""
    lines = _md_header(results) + _md_fd(results) + _md_mi(results) + _md_scalars(results)
    return "\n".join(lines).rstrip() + "\n"


def write_report(out_dir: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    """Write out_dir/report.json (sorted, indented; atomic) and the readable out_dir/report.md.

    Expected `results` layout (extra keys, such as "game", "model" or "reference", are kept and shown)::

        {"run_dir": str, "step": int, "seed": int, "n": int, "chain_steps": int,
         "fd": {network_name: {"random_code": float, "limiting_chain": float, "reconstruction": float}},
         "fd_networks": {network_name: {"kind": "classifier"|"inception", "sha256": str,
                                        "valid_accuracy": float|None}},
         "fid_skipped": str | None,
         "consistency_gap": {network_name: float},                    # limiting_chain - random_code
         "mi": {"encoder": {factor: {"mean": float, "active": int, "dims": int}}, "decoder": {...}},
         "reconstruction_error": {"metric": str, "value": float},
         "probe": {"accuracy": float, "latent": str, "num_train": int, "num_test": int},
         "figures": {name: png_path_relative_to_out_dir}}

    Returns:
        (path of report.json, path of report.md).
    """
    text = json.dumps(results, indent=2, sort_keys=True, default=_json_default) + "\n"  # fails before any write
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    _write_atomic(json_path, text)
    _write_atomic(md_path, render_markdown(results))
    return json_path, md_path


# ---------------------------------------------------------------------------------------------------------------
# comparison of runs
# ---------------------------------------------------------------------------------------------------------------

def _load_report(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "eval" / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation report at {path}; run `symeq eval {run_dir}` first")
    return json.loads(path.read_text(encoding="utf-8"))


def _column_names(run_dirs: list[Path], reports: list[dict[str, Any]]) -> list[str]:
    """Run dir name, plus the game kind when the results hold one; repeated names get a #index."""
    names = [Path(d).resolve().name + (f" ({r['game']})" if r.get("game") else "") for d, r in zip(
        run_dirs, reports, strict=True)]
    return [f"{name} #{i + 1}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def _networks(reports: list[dict[str, Any]]) -> list[str]:
    """Every feature network used by any run, in order of first appearance."""
    return list(dict.fromkeys(net for r in reports for net in r.get("fd", {})))


def _comparison_warnings(names: list[str], reports: list[dict[str, Any]]) -> list[str]:
    checks = {
        "feature networks": [", ".join(sorted(r.get("fd", {}))) for r in reports],
        "feature network weights (sha256)": [", ".join(f"{k}={v.get('sha256')}" for k, v in sorted(
            r.get("fd_networks", {}).items())) for r in reports],
        "n": [str(r.get("n")) for r in reports],
        "chain steps": [str(r.get("chain_steps")) for r in reports],
        "reference set": [json.dumps(r.get("reference"), sort_keys=True) for r in reports],
        "reconstruction metric": [str((r.get("reconstruction_error") or {}).get("metric")) for r in reports],
    }
    warnings: list[str] = []
    for what, values in checks.items():
        if len(set(values)) > 1:
            per_run = "; ".join(f"{name}: {value}" for name, value in zip(names, values, strict=True))
            warnings += [f"> **Warning:** runs differ in {what} ({per_run}); {COMPARABILITY}.", ""]
    return warnings


def _comparison_rows(reports: list[dict[str, Any]]) -> list[list[str]]:
    rows = [["step", *(_num(r.get("step")) for r in reports)], ["n", *(_num(r.get("n")) for r in reports)],
            ["chain steps", *(_num(r.get("chain_steps")) for r in reports)]]
    for net in _networks(reports):
        for name in FD_SETS:
            rows.append([f"{net} {name}", *(_num(r.get("fd", {}).get(net, {}).get(name)) for r in reports)])
        rows.append([f"{net} gap (limiting − random)", *(_num(r.get("consistency_gap", {}).get(net))
                                                          for r in reports)])
    rows.append(["probe accuracy", *(_num((r.get("probe") or {}).get("accuracy")) for r in reports)])
    rows.append(["reconstruction error", *(_num((r.get("reconstruction_error") or {}).get("value"))
                                           for r in reports)])
    factors = dict.fromkeys((p, f) for r in reports for p, fs in r.get("mi", {}).items() for f in fs)
    for player, factor in factors:
        cells = [r.get("mi", {}).get(player, {}).get(factor) for r in reports]
        rows.append([f"active latents {player}/{factor}",
                     *("n/a" if c is None else f"{c.get('active')}/{c.get('dims')}" for c in cells)])
    return rows


def _common_network(reports: list[dict[str, Any]]) -> str | None:
    """The first network (in the first run's order) that every run has an FD for."""
    return next((net for net in reports[0].get("fd", {}) if all(net in r.get("fd", {}) for r in reports)), None)


def _bar_plot(names: list[str], reports: list[dict[str, Any]], network: str, out_png: Path) -> None:
    """Grouped bars: FD of random-code and limiting-chain samples per run, in `network` features."""
    fig = Figure(figsize=(max(4.0, 1.3 * len(names) + 2.0), 3.8), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    positions = np.arange(len(names))
    for offset, name, color in ((-0.2, "random_code", "tab:blue"), (0.2, "limiting_chain", "tab:orange")):
        values = [float(r["fd"][network].get(name, math.nan)) for r in reports]
        ax.bar(positions + offset, values, width=0.4, color=color, label=name.replace("_", " "))
    ax.set_xticks(positions, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(network)
    ax.set_ylim(0.0, 1.25 * ax.get_ylim()[1])  # head room for the legend
    ax.set_title(f"{network}: random code vs limiting chain", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, out_png)


def compare_runs(run_dirs: list[Path], out_md: Path | None, out_png: Path | None) -> str:
    """Side-by-side markdown table of the evaluation reports of several runs (one column per run).

    Reads <run_dir>/eval/report.json of each run. Rows: FD per network and set, consistency gap, probe accuracy,
    reconstruction error and active latents per player/factor; warning lines when the runs used different
    feature networks, n, chain steps or reference sets (METHOD §13.2).

    Args:
        out_md: where to write the table too (optional).
        out_png: grouped bar plot of FD random code vs limiting chain per run, in the first network all runs share.

    Raises:
        FileNotFoundError: a run has no report (the message names `symeq eval <run_dir>`).
        ValueError: no runs, or a plot was asked for but the runs share no feature network.
    """
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run directory")
    reports = [_load_report(Path(d)) for d in run_dirs]
    names = _column_names([Path(d) for d in run_dirs], reports)
    network = _common_network(reports)
    if out_png is not None and network is None:
        raise ValueError("the runs share no feature network, so there is no common FD to plot; evaluate them "
                         "with the same feature network (symeq eval --features FILE) or leave out the plot")
    lines = ["# symeq run comparison", "", *_comparison_warnings(names, reports)]
    lines += ["", *_table(["metric", *names], _comparison_rows(reports))]
    text = "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"
    if out_md is not None:
        _write_atomic(out_md, text)
    if out_png is not None and network is not None:
        _bar_plot(names, reports, network, out_png)
    return text
