"""Priors in code space: a run's top-latent codes, and how close a prior's samples are to held-out codes.

`encode_split` draws z_top ~ q(z_top | x) once for every clean image of a split, in shard order, from one seeded
generator (`symeq prior codes`). `evaluate` (`symeq prior eval`) compares a prior's samples with held-out codes:
the Fréchet distance of the flattened codes (as FID does with features), the mean absolute error of the
per-dimension means and standard deviations, the same for the closed-form prior of that family (N(0, I) or
uniform bits) — for a run trained with the closed form the held-out codes are its aggregate posterior, and the
gap between the two rows is what a two-stage prior can recover — and for as many codes of the training split
(the stored codes as a prior; about the floor a perfect prior reaches at this n, since FD is biased upwards by
a finite n).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from symeq_dist.data import load_manifest
from symeq_dist.data.stream import iter_eval_batches
from symeq_dist.data.transforms import to_float
from symeq_dist.errors import InputError
from symeq_dist.eval.frechet import GaussianStats, frechet_distance_stats
from symeq_dist.priors.closed_form import StandardGaussian, UniformBits
from symeq_dist.priors.trainer import draw_codes, first_codes, load_prior


@torch.no_grad()
def encode_split(model: Any, split: str, *, seed: int, batch_size: int = 500) -> np.ndarray:
    """z_top ~ q(z_top | x) for every clean image of `split` of a trained run's data (float32, shard order)."""
    cfg, device = model.cfg, model.device
    shards = Path(cfg.data.shards)
    manifest = load_manifest(shards)
    if split not in manifest["splits"]:
        raise InputError(f"--split {split}: {shards} has splits {sorted(manifest['splits'])}")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    top = model.decoder.latent_names[0]
    total = manifest["splits"][split]["num_samples"]
    out = []
    with tqdm(total=total, desc=f"codes of {split}", unit="img", disable=total < 2) as bar:
        for batch in iter_eval_batches(shards, manifest, split=split, batch_size=batch_size):
            x = to_float(batch["image"], cfg.data).to(device)
            z, _ = model.encoder.sample(x, model.decoder, gen)
            out.append(z[top].float().cpu().numpy())
            bar.update(len(x))
    return np.concatenate(out)


def compare(samples: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Fréchet distance of the flattened codes and the mean absolute errors of the per-dimension moments."""
    a, b = (rows.reshape(len(rows), -1).astype(np.float64) for rows in (samples, reference))
    stats = []
    for rows in (a, b):
        s = GaussianStats(rows.shape[1])
        s.update(rows)
        stats.append(s)
    return {"fd": float(frechet_distance_stats(*stats)),
            "mean_abs_err": float(np.abs(a.mean(0) - b.mean(0)).mean()),
            "std_abs_err": float(np.abs(a.std(0) - b.std(0)).mean())}


def evaluate(run_dir: Path, *, codes: Path | None, split: str | None, num: int, seed: int,
             ema: bool, sample_steps: int = 0) -> dict[str, Any]:
    """`symeq prior eval`: the prior's samples, the closed-form prior's and as many training codes (the prior the
    stored codes themselves are, prior.kind=shards), each against `num` held-out codes."""
    prior = load_prior(run_dir, ema=ema, sample_steps=sample_steps)
    shards = Path(codes or prior.cfg.data.shards)
    split = split or prior.cfg.data.eval_split
    reference = first_codes(shards, split, num).numpy()
    num = len(reference)
    closed = (StandardGaussian if prior.family == "gaussian" else UniformBits)(prior.shape)
    baseline = closed.sample(num, torch.Generator().manual_seed(seed + 1), torch.device("cpu")).numpy()
    train_split = prior.cfg.data.split
    stored = first_codes(shards, train_split, num).numpy() if train_split != split else None
    return {"prior_run": str(run_dir), "step": prior.step, "kind": prior.cfg.model.kind, "family": prior.family,
            "shape": list(prior.shape), "codes": str(shards), "split": split, "n": num,
            "sample_steps": getattr(prior.model, "sample_steps", None),
            "weights": "averaged" if prior.ema else "trained",
            "prior": compare(draw_codes(prior.model, num, seed), reference),
            "closed_form": compare(baseline, reference),
            "training_codes": None if stored is None else compare(stored, reference)}


def format_report(report: dict[str, Any]) -> str:
    rows = [("this prior", report["prior"]),
            ("N(0, I)" if report["family"] == "gaussian" else "uniform bits", report["closed_form"])]
    if report.get("training_codes"):
        rows.append(("the training codes", report["training_codes"]))
    lines = [f"prior {report['prior_run']} ({report['kind']}, step {report['step']}, {report['weights']} weights) "
             f"against {report['n']} held-out codes of {report['codes']} ({report['split']}), shape "
             f"{tuple(report['shape'])}:", f"  {'':24s} {'FD':>10s} {'|mean err|':>11s} {'|std err|':>10s}"]
    for name, r in rows:
        fd = f"{r['fd']:10.4f}" if math.isfinite(r["fd"]) else f"{'nan':>10s}"
        lines.append(f"  {name:24s} {fd} {r['mean_abs_err']:11.4f} {r['std_abs_err']:10.4f}")
    return "\n".join(lines)
