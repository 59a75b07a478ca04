"""A class latent in `symeq eval` (semi-supervised runs, METHOD §7.4): accuracy, class-conditional samples, t-SNE;
for attribute bits (`model.label: attributes`) the accuracy per attribute.

For a model whose top latent is categorical and shards with class labels: the accuracy of argmax q(c | x) on
the whole held-out split; `classes.png`, ten samples x ~ p(x | c) per class, one row per class; and
`tsne_classes.png`, the means of the other latents' q for the first `tsne_points` held-out images coloured by
their class (the paper's Fig. 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from symeq_dist import sampling
from symeq_dist.data import build_eval_batches, load_manifest, to_float
from symeq_dist.eval.export import write_samples
from symeq_dist.eval.figures import tsne_figure
from symeq_dist.eval.model import TrainedModel
from symeq_dist.eval.options import EvalOptions


def class_report(model: TrainedModel, opts: EvalOptions, out_dir: Path) -> dict[str, Any] | None:
    """The class latent's section of the report (its figures written to `out_dir`), or None without one."""
    cfg = model.cfg
    label = load_manifest(cfg.data.shards).get("label", {"kind": "class"})
    if getattr(cfg.model, "label", None) == "attributes":
        return _attribute_report(model, opts, label or {})
    if model.decoder.top_family != "categorical" or label is None or label.get("kind") != "class":
        return None
    top, right, total = model.decoder.latent_names[0], 0, 0
    codes: list[Tensor] = []
    labels: list[Tensor] = []
    for batch, q in _held_out_posteriors(model, opts):
        right += int((q[top].mean().argmax(dim=1).cpu() == batch["label"]).sum())
        total += len(batch["label"])
        if sum(map(len, labels)) < opts.tsne_points:
            rows = len(batch["label"])
            codes.append(torch.cat([q[name].mean().reshape(rows, -1).float().cpu() for name in q if name != top], 1))
            labels.append(batch["label"])
    report: dict[str, Any] = {"accuracy": right / max(total, 1), "n": total, "split": cfg.data.eval_split,
                              "labels_per_class": cfg.data.labels_per_class, "figures": {"classes": "classes.png"}}
    gen = torch.Generator(device=model.device).manual_seed(opts.seed)
    write_samples([sampling.class_conditional(model.decoder, 10, gen, model.device)], out_dir / "classes.png", "grid",
                  nrow=10)
    points, classes = torch.cat(codes)[:opts.tsne_points].numpy(), torch.cat(labels)[:opts.tsne_points].numpy()
    if len(classes) >= 8:
        name = "+".join(model.decoder.latent_names[1:])
        key = f"q({name} | x) means"
        tsne_figure({key: points}, {key: classes}, out_dir / "tsne_classes.png", seed=opts.seed,
                    perplexity=min(30.0, len(classes) / 4),
                    title=f"held-out images: their {name} codes, coloured by class")
        report["figures"]["tsne_classes"] = "tsne_classes.png"
    return report


def _attribute_report(model: TrainedModel, opts: EvalOptions, label: dict[str, Any]) -> dict[str, Any]:
    """Attribute bits as the top latent: the accuracy of q(c_a | x) > 1/2 per attribute on the held-out split, and
    their mean (no figures)."""
    cfg, right, total = model.cfg, None, 0
    for batch, q in _held_out_posteriors(model, opts):
        hits = ((q["c"].mean() > 0.5).cpu() == batch["label"].bool()).sum(0)
        right = hits if right is None else right + hits
        total += len(batch["label"])
    per = (right.double() / max(total, 1)).tolist() if right is not None else []
    return {"attribute_accuracy": sum(per) / max(len(per), 1), "per_attribute": dict(zip(label.get("names", []),
            per, strict=False)), "n": total, "split": cfg.data.eval_split,
            "labelled_fraction": cfg.data.labelled_fraction, "figures": {}}


def _held_out_posteriors(model: TrainedModel, opts: EvalOptions) -> Iterator[tuple[dict[str, Tensor], dict[str, Any]]]:
    """Every batch of the held-out split with the encoder's q-factors at a draw z ~ q(z | x) of its own."""
    cfg = model.cfg
    for batch in build_eval_batches(cfg.data, split=cfg.data.eval_split, batch_size=opts.batch_size):
        x = to_float(batch["image"], cfg.data).to(model.device)
        with torch.no_grad():
            z, _ = model.encoder.sample(x, model.decoder, torch.Generator(device=model.device))
            q = model.encoder.conditionals(x, z, model.decoder)
        yield batch, q
