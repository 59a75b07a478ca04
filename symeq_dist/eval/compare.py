"""`symeq compare`: evaluated runs side by side, as a markdown table and a bar plot, with comparability warnings;
for runs evaluated at several steps, FD and consistency gap against the training step (curves and a table).

Must not import tensorboard or deepspeed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from symeq_dist.errors import InputError, MissingInput
from symeq_dist.eval.figures import DPI, Series, curves_figure, save_figure
from symeq_dist.eval.report import COMPARABILITY, FD_SETS, chain_fd, chain_lengths, num, table, write_atomic


def _load_report(run_dir: Path) -> dict[str, Any]:
    """<run_dir>/eval/report.json (the most recent evaluation), else the report of its last evaluated step."""
    path = Path(run_dir) / "eval" / "report.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    steps = step_reports(run_dir)
    if not steps:
        raise MissingInput(f"no evaluation report at {path}; run `symeq eval {run_dir}` first")
    return steps[-1]


def step_reports(run_dir: Path) -> list[dict[str, Any]]:
    """Every evaluated step of a run (<run_dir>/eval/step_*/report.json), in step order."""
    paths = sorted((Path(run_dir) / "eval").glob("step_*/report.json"))
    return sorted((json.loads(p.read_text(encoding="utf-8")) for p in paths), key=lambda r: int(r["step"]))


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
    rows = [["step", *(num(r.get("step")) for r in reports)], ["n", *(num(r.get("n")) for r in reports)],
            ["chain steps", *(num(r.get("chain_steps")) for r in reports)]]
    several = sorted({k for r in reports for k in chain_lengths(r)}) if any(
        len(chain_lengths(r)) > 1 for r in reports) else []
    for net in _networks(reports):
        for name in FD_SETS:
            rows.append([f"{net} {name}", *(num(r.get("fd", {}).get(net, {}).get(name)) for r in reports)])
        rows += [[f"{net} limiting_chain@{k}", *(num(chain_fd(r, net, k)) for r in reports)] for k in several]
        rows.append([f"{net} gap (limiting − random)", *(num(r.get("consistency_gap", {}).get(net))
                                                          for r in reports)])
    rows.append(["probe accuracy", *(num((r.get("probe") or {}).get("accuracy")) for r in reports)])
    rows.append(["bits/dim (negative ELBO)", *(num((r.get("bits_per_dim") or {}).get("elbo_bpd")) for r in reports)])
    rows.append(["reconstruction error", *(num((r.get("reconstruction_error") or {}).get("value"))
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
    save_figure(fig, out_png)


def _curve_panels(names: list[str], histories: list[list[dict[str, Any]]], network: str) -> list[tuple[str, Series]]:
    """FD of random codes, of the chain after each length, and the gap per length, against the training step."""
    lengths = sorted({length for history in histories for r in history for length in chain_lengths(r)})

    def series(value: Callable[[dict[str, Any]], float | None]) -> Series:
        out: Series = {}
        for name, history in zip(names, histories, strict=True):
            points = [(float(r["step"]), value(r)) for r in history]
            out[name] = ([x for x, _ in points], [math.nan if y is None else float(y) for _, y in points])
        return out

    def gap(r: dict[str, Any], length: int) -> float | None:
        chain, random = chain_fd(r, network, length), r.get("fd", {}).get(network, {}).get("random_code")
        return None if chain is None or random is None else chain - random

    panels = [("random code", series(lambda r: r.get("fd", {}).get(network, {}).get("random_code")))]
    panels += [(f"limiting chain, {length} steps", series(lambda r, k=length: chain_fd(r, network, k)))
               for length in lengths]
    panels += [(f"gap (chain − random), {length} steps", series(lambda r, k=length: gap(r, k))) for length in lengths]
    return panels


def _curve_rows(names: list[str], histories: list[list[dict[str, Any]]], network: str) -> list[str]:
    """The markdown table behind the curves: one row per run and evaluated step."""
    lengths = sorted({length for history in histories for r in history for length in chain_lengths(r)})
    header = ["run", "step", "n", "random code", *(f"chain {k}" for k in lengths), *(f"gap {k}" for k in lengths)]
    rows = []
    for name, history in zip(names, histories, strict=True):
        for r in history:
            random = r.get("fd", {}).get(network, {}).get("random_code")
            chains = [chain_fd(r, network, k) for k in lengths]
            gaps = [None if c is None or random is None else c - random for c in chains]
            rows.append([name, str(r.get("step")), str(r.get("n")), num(random, 1), *(num(c, 1) for c in chains),
                         *(num(g, 1) for g in gaps)])
    return ["## Across training", "", f"{network}, every evaluated step (<run_dir>/eval/step_*/report.json); "
            f"{COMPARABILITY}.", "", *table(header, rows), ""]


def compare_curves(run_dirs: list[Path], out_png: Path | None) -> tuple[list[str], str | None]:
    """FD and gap against the training step for runs evaluated at several steps (`symeq eval --step`).

    Returns:
        (markdown lines of the table, or [] when no run has two evaluated steps; the network drawn, or None).
    """
    names = _column_names(run_dirs, [_load_report(d) for d in run_dirs])
    histories = [step_reports(d) for d in run_dirs]
    if max((len(h) for h in histories), default=0) < 2:
        return [], None
    network = _common_network([r for h in histories for r in h])
    if network is None:
        raise InputError("the runs' evaluated steps share no feature network, so there is no common FD to draw; "
                         "evaluate them with the same feature network (symeq eval --features FILE)")
    if out_png is not None:
        lengths = {length for history in histories for r in history for length in chain_lengths(r)}
        curves_figure(_curve_panels(names, histories, network), out_png, ncols=1 + len(lengths),
                      xlabel="training step", ylabel=network, title=f"{network} against the training step")
    return _curve_rows(names, histories, network), network


def compare_runs(run_dirs: list[Path], out_md: Path | None, out_png: Path | None, *,
                 out_curves: Path | None = None) -> str:
    """Side-by-side markdown table of the evaluation reports of several runs (one column per run).

    Reads <run_dir>/eval/report.json of each run. Rows: FD per network and set, consistency gap, probe accuracy,
    reconstruction error and active latents per player/factor; warning lines when the runs used different
    feature networks, n, chain steps or reference sets (METHOD §13.2).

    Args:
        out_md: where to write the table too (optional).
        out_png: grouped bar plot of FD random code vs limiting chain per run, in the first network all runs share.
        out_curves: when a run has two or more evaluated steps (`symeq eval --step`), small multiples of FD (random
            code, limiting chain after each length) and the gap against the training step, one line per run; the
            table behind them is appended to the text ("Across training").

    Raises:
        FileNotFoundError: a run has no report (the message names `symeq eval <run_dir>`).
        ValueError: no runs, or a plot was asked for but the runs share no feature network.
    """
    if not run_dirs:
        raise InputError("compare_runs needs at least one run directory")
    reports = [_load_report(Path(d)) for d in run_dirs]
    names = _column_names([Path(d) for d in run_dirs], reports)
    network = _common_network(reports)
    if out_png is not None and network is None:
        raise InputError("the runs share no feature network, so there is no common FD to plot; evaluate them "
                         "with the same feature network (symeq eval --features FILE) or leave out the plot")
    lines = ["# symeq run comparison", "", *_comparison_warnings(names, reports)]
    lines += ["", *table(["metric", *names], _comparison_rows(reports)), ""]
    lines += compare_curves([Path(d) for d in run_dirs], out_curves)[0]
    text = "\n".join(lines).replace("\n\n\n", "\n\n").rstrip() + "\n"
    if out_md is not None:
        write_atomic(out_md, text)
    if out_png is not None and network is not None:
        _bar_plot(names, reports, network, out_png)
    return text
