"""report.json / report.md of one evaluated run (METHOD §13). Rendering only: the numbers come from `run.py`.

Must not import tensorboard or deepspeed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

FD_SETS = ("random_code", "limiting_chain", "reconstruction")
LIMITING = "limiting_chain"  # the longest chain; "limiting_chain@L" after L steps when several lengths were asked
ACTIVE_MI = 0.01  # nats: a latent dimension with MI below this is inactive (collapsed), METHOD §13.3
COMPARABILITY = "FD numbers are comparable only at equal feature network, reference set and n (METHOD §13.2)"


def chain_key(length: int) -> str:
    """The report key of the limiting chain after `length` steps: "limiting_chain@100"."""
    return f"{LIMITING}@{length}"


def chain_lengths(results: dict[str, Any]) -> list[int]:
    """The limiting-chain lengths an evaluation measured (reports older than chain lists have one)."""
    lengths = results.get("chain_lengths")
    if lengths:
        return [int(v) for v in lengths]
    return [int(results["chain_steps"])] if results.get("chain_steps") is not None else []


def chain_fd(results: dict[str, Any], network: str, length: int) -> float | None:
    """FD of the limiting chain after `length` steps in `network` features; None when not measured."""
    fd = results.get("fd", {}).get(network, {})
    if chain_key(length) in fd:
        return fd[chain_key(length)]
    lengths = chain_lengths(results)
    return fd.get(LIMITING) if lengths and length == lengths[-1] else None


def num(value: Any, digits: int = 4) -> str:
    """A table cell: floats with `digits` decimals, ints as they are, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or isinstance(value, int | np.integer):
        return str(value)
    value = float(value)
    return str(value) if not math.isfinite(value) else f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def write_atomic(path: Path, text: str) -> None:
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
             f"- limiting-chain steps: {', '.join(map(str, chain_lengths(results))) or 'n/a'}"]
    if results.get("ema_weights"):
        lines.append("- weights: the run's exponential moving averages (train.ema_decay)")
    lines += [f"- {key}: {results[key]}" for key in ("game", "model", "prior") if key in results]
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
    lengths = chain_lengths(results)
    by_length: dict[str, dict[str, float]] = results.get("consistency_gap_by_length", {})
    if networks:
        names = [*FD_SETS, *(chain_key(length) for length in lengths if any(
            chain_key(length) in fd[net] for net in networks))]
        rows = [[name, *(num(fd[net].get(name)) for net in networks)] for name in names]
        rows.append(["**consistency gap** (limiting − random)", *(num(gap.get(net)) for net in networks)])
        if by_length:
            rows += [[f"gap after {length} chain steps", *(num(by_length.get(net, {}).get(str(length)))
                                                          for net in networks)] for length in lengths]
        lines += [*table(["set", *networks], rows), ""]
    else:
        lines += ["No Fréchet distances were computed.", ""]
    info: dict[str, dict[str, Any]] = results.get("fd_networks", {})
    if info:
        rows = [[net, str(meta.get("kind", "n/a")), str(meta.get("target", "n/a")),
                 f"`{str(meta.get('sha256') or 'n/a')[:16]}`", num(meta.get("valid_accuracy"))]
                for net, meta in info.items()]
        lines += [*table(["network", "kind", "trained on", "sha256 (first 16)", "accuracy"], rows), ""]
    if results.get("fid_skipped"):
        lines += [f"> FID skipped: {results['fid_skipped']}", ""]
    return lines


def _md_mi(results: dict[str, Any]) -> list[str]:
    mi: dict[str, dict[str, dict[str, Any]]] = results.get("mi", {})
    rows = [[player, factor, num(row.get("mean")), str(row.get("active", "n/a")), str(row.get("dims", "n/a"))]
            for player, factors in mi.items() for factor, row in factors.items()]
    if not rows:
        return []
    return ["## Latent mutual information (nats)", "",
            *table(["player", "factor", "mean MI", f"active (MI ≥ {ACTIVE_MI})", "dims"], rows), ""]


def _md_diagnostics(results: dict[str, Any]) -> list[str]:
    """The consistency diagnostics (`eval/diagnostics.py`): joint NLL pairs, posterior spread, code drift."""
    diag: dict[str, Any] = results.get("diagnostics") or {}
    if not diag:
        return []
    lines = ["## Consistency diagnostics", "",
             "Mean −log f per dimension (nats) of every factor f under the decoder's joint π(z) p(x|z) (dreams) and "
             "the data joint π(x) q(z|x) (data); gap = dreams − data, 0 for a consistent pair. The encoder trains "
             "on its dreams column, the decoder on its data column.", ""]
    rows = [[player, name, str(row.get("dims")), num(row.get("dreams")), num(row.get("data")), num(row.get("gap"))]
            for player, factors in diag.get("joint_nll", {}).items() for name, row in factors.items()]
    lines += [*table(["player", "factor", "dims", "dreams", "data", "gap"], rows), ""]
    post = diag.get("posterior", {})
    if post.get("data") or post.get("dreams"):
        lines += [f"Encoder factor of the top latent `{post.get('latent')}` ({post.get('family')}), per dimension; "
                  f"prior variance {num(post.get('prior_variance'))}:", ""]
        rows = [[where, num(post[where].get("variance")), num(post[where].get("entropy"))]
                for where in ("data", "dreams") if where in post]
        lines += [*table(["inputs", "posterior variance", "posterior entropy"], rows), ""]
    codes = diag.get("codes", {})
    sets = [(name, row) for name, row in codes.items() if isinstance(row, dict)]
    if sets:
        lines += [f"Codes of the top latent `{codes.get('latent')}` ({codes.get('dims')} dims): mean of the "
                  "per-dimension means and variances, Fréchet distance to the prior samples:", ""]
        rows = [[name, num(row.get("mean")), num(row.get("variance")), num(row.get("fd_to_prior"))]
                for name, row in sets]
        lines += [*table(["codes", "mean", "variance", "FD to prior"], rows), ""]
    if codes.get("skipped"):
        lines += [f"Code drift of the top latent `{codes.get('latent')}` skipped: {codes['skipped']}.", ""]
    return lines


def _md_scalars(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    recon = results.get("reconstruction_error")
    if recon:
        lines += ["## Reconstruction error", "", f"{recon.get('metric', 'error')}: {num(recon.get('value'))}", ""]
    bpd = results.get("bits_per_dim")
    if bpd and bpd.get("skipped"):
        lines += ["## Bits per dimension", "", f"Skipped: {bpd['skipped']}.", ""]
    elif bpd:
        bound = (f"; importance-weighted bound (K = {bpd['num_samples']}) {num(bpd['iw_bpd'])}"
                 if bpd.get("iw_bpd") is not None else "")
        note = "" if bpd.get("discrete", True) else " (a Gaussian p(x|z) is a density: 8 bits per dimension added)"
        lines += ["## Bits per dimension", "",
                  f"Negative ELBO {num(bpd.get('elbo_bpd'))} bits/dim on {bpd.get('num_images')} images of the "
                  f"`{bpd.get('split')}` split, the encoder as proposal{bound}{note}.", ""]
    classes = results.get("class_accuracy")
    if classes and "attribute_accuracy" in classes:
        lines += ["## Attribute latent", "",
                  f"Mean over attributes of the accuracy of q(c_a | x) > 1/2 on the {classes.get('n')} images of the "
                  f"`{classes.get('split')}` split: {num(classes.get('attribute_accuracy'))} (trained with "
                  f"data.labelled_fraction = {classes.get('labelled_fraction')}).", ""]
    elif classes:
        lines += ["## Class latent", "",
                  f"Accuracy of argmax q(c | x) on the {classes.get('n')} images of the `{classes.get('split')}` "
                  f"split: {num(classes.get('accuracy'))} (trained with data.labels_per_class = "
                  f"{classes.get('labels_per_class')}).", ""]
    seg = results.get("segmentation")
    if seg:
        lines += ["## Segmentation", "",
                  f"argmax q(s | x) on the {seg.get('n')} images of the `{seg.get('split')}` split: mIoU "
                  f"{num(seg.get('miou'))}, pixel accuracy {num(seg.get('pixel_accuracy'))} (trained with "
                  f"data.labelled_fraction = {seg.get('labelled_fraction')}). Cycle score, the same on images "
                  f"x ~ p(x | s, z), z ~ p(z | s), generated from those images' maps: mIoU "
                  f"{num(seg.get('cycle_miou'))}, pixel accuracy {num(seg.get('cycle_pixel_accuracy'))}.", ""]
    probe = results.get("probe")
    if probe:
        lines += ["## Linear probe", "",
                  f"Test accuracy {num(probe.get('accuracy'))} of a logistic regression on `{probe.get('latent')}` "
                  f"codes ({probe.get('num_train')} train / {probe.get('num_test')} test).", ""]
    figures: dict[str, str] = results.get("figures", {})
    if figures:
        lines += ["## Figures", ""]
        lines += [f"- [{name}]({path})\n\n  ![{name}]({path})" for name, path in figures.items()] + [""]
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """The readable report.md text of one evaluation (layout: see `write_report`)."""
    lines = (_md_header(results) + _md_fd(results) + _md_diagnostics(results) + _md_mi(results)
             + _md_scalars(results))
    return "\n".join(lines).rstrip() + "\n"


def write_report(out_dir: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    """Write out_dir/report.json (sorted, indented; atomic) and the readable out_dir/report.md.

    Expected `results` layout (extra keys, such as "game", "model" or "reference", are kept and shown)::

        {"run_dir": str, "step": int, "seed": int, "n": int, "chain_steps": int,   # the longest chain
         "chain_lengths": [int, ...],                                                # every measured length
         "fd": {network_name: {"random_code": float, "limiting_chain": float, "reconstruction": float,
                               "limiting_chain@L": float, ...}},                    # @L: only for several lengths
         "consistency_gap_by_length": {network_name: {"L": float}},                 # only for several lengths
         "diagnostics": {"joint_nll": ..., "posterior": ..., "codes": ...},         # eval/diagnostics.py
         "fd_networks": {network_name: {"kind": "classifier"|"inception", "sha256": str,
                                        "valid_accuracy": float|None}},
         "fid_skipped": str | None,
         "consistency_gap": {network_name: float},                    # limiting_chain - random_code
         "mi": {"encoder": {factor: {"mean": float, "active": int, "dims": int}}, "decoder": {...}},
         "reconstruction_error": {"metric": str, "value": float},
         "probe": {"accuracy": float, "latent": str, "num_train": int, "num_test": int},
         "bits_per_dim": {"elbo_bpd": float, "iw_bpd": float|None, "num_samples": int, "num_images": int,
                          "split": str, "discrete": bool} | {"skipped": str, "split": str},
         "figures": {name: png_path_relative_to_out_dir}}

    Returns:
        (path of report.json, path of report.md).
    """
    text = json.dumps(results, indent=2, sort_keys=True, default=_json_default) + "\n"  # fails before any write
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    write_atomic(json_path, text)
    write_atomic(md_path, render_markdown(results))
    return json_path, md_path
