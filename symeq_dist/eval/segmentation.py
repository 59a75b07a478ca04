"""Segmentation metrics and the image + segmentation model's section of `symeq eval` (METHOD §7.6): a confusion
matrix accumulated over batches, then pixel accuracy and the mean intersection-over-union over the classes that
occur; the cycle score; the paper's Fig. 3 (style transfer) and Fig. 4 (rows of data, reconstructions,
segmentations and limiting-chain pairs) grids.

IoU of class k = TP_k / (TP_k + FP_k + FN_k); classes with an empty union (neither predicted nor in the targets)
are left out of the mean, not counted as 0 or 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from symeq_dist import sampling
from symeq_dist.data import build_eval_batches, to_float
from symeq_dist.eval.export import write_samples
from symeq_dist.eval.model import TrainedModel
from symeq_dist.eval.options import EvalOptions


class Confusion:
    """counts[t, p]: pixels of target class t predicted as class p, over every `update`."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, predicted: Tensor, target: Tensor) -> None:
        """Integer label maps of one shape, e.g. (B, H, W); values in 0..num_classes-1."""
        if predicted.shape != target.shape:
            raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} differ in shape")
        index = target.reshape(-1).long().cpu() * self.num_classes + predicted.reshape(-1).long().cpu()
        self.counts += torch.bincount(index, minlength=self.num_classes ** 2).reshape(self.num_classes, -1)

    def pixel_accuracy(self) -> float:
        return float(self.counts.diag().sum() / self.counts.sum().clamp_min(1))

    def iou(self) -> Tensor:
        """(K,) IoU per class, NaN where the union is empty."""
        tp = self.counts.diag().double()
        union = self.counts.sum(0).double() + self.counts.sum(1).double() - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))

    def mean_iou(self) -> float:
        """The mean IoU over the classes whose union is not empty."""
        iou = self.iou()
        present = ~torch.isnan(iou)
        return float(iou[present].mean()) if present.any() else float("nan")


# ---- the image + segmentation model's section of `symeq eval` (model.kind=seg_hvae, METHOD §7.6)

def palette(num_classes: int) -> Tensor:
    """(K, 3) colours in [0, 1]: class 0 (background) black, the others evenly spaced hues."""
    import colorsys

    hues = [colorsys.hsv_to_rgb(i / max(num_classes - 1, 1), 0.85, 1.0) for i in range(num_classes - 1)]
    return torch.tensor([(0.0, 0.0, 0.0), *hues])


def colour(maps: Tensor, num_classes: int) -> Tensor:
    """Integer label maps (B, H, W) -> RGB images (B, 3, H, W) in [0, 1]."""
    return palette(num_classes)[maps.long().cpu()].permute(0, 3, 1, 2)


def rgb(images: Tensor) -> Tensor:
    """(B, C, H, W) images in [0, 1] as RGB on the CPU (grey repeated)."""
    images = images.detach().float().cpu()
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def segmentation_report(model: TrainedModel, opts: EvalOptions, out_dir: Path) -> dict[str, Any] | None:
    """mIoU and pixel accuracy of argmax q(s | x) on the whole held-out split, the cycle score (the same of q(s | x) on
    images x ~ p(x | s, z), z ~ p(z | s), generated from the held-out maps s, against those maps), and the Fig. 3
    and Fig. 4 grids; None for a model without a label-map latent."""
    if not hasattr(model.encoder, "segment"):
        return None
    cfg, device = model.cfg, model.device
    num_classes = model.decoder.latent_shapes["s"][0]
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    direct, cycle = Confusion(num_classes), Confusion(num_classes)
    first: dict[str, Tensor] = {}
    seen = 0
    for batch in build_eval_batches(cfg.data, split=cfg.data.eval_split, batch_size=opts.batch_size):
        x, target = to_float(batch["image"], cfg.data).to(device), batch["mask"].long()
        with torch.no_grad():
            direct.update(model.encoder.segment(x).logits.argmax(1), target)
            s = _one_hot(target.to(device), num_classes)
            _, generated, _ = model.decoder.sample(s, gen)
            cycle.update(model.encoder.segment(generated).logits.argmax(1), target)
        if not first:
            first = {"x": x[:8], "s": s[:8]}
        seen += len(target)
    figures = {"style_transfer": "style_transfer.png", "segmentation_rows": "segmentation_rows.png"}
    write_samples([_style_transfer(model, first["x"][:6], first["s"][:6], gen)], out_dir / figures["style_transfer"],
                  "grid", nrow=7)
    write_samples([_rows(model, first["x"], first["s"], gen, opts.chain_lengths[-1])],
                  out_dir / figures["segmentation_rows"], "grid", nrow=len(first["x"]))
    return {"split": cfg.data.eval_split, "n": seen, "miou": direct.mean_iou(),
            "pixel_accuracy": direct.pixel_accuracy(), "iou": direct.iou().tolist(),
            "cycle_miou": cycle.mean_iou(), "cycle_pixel_accuracy": cycle.pixel_accuracy(),
            "labelled_fraction": cfg.data.labelled_fraction, "figures": figures}


def _one_hot(maps: Tensor, num_classes: int) -> Tensor:
    return torch.nn.functional.one_hot(maps.long(), num_classes).movedim(-1, 1).float()


def _given(model: TrainedModel, x: Tensor, s: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
    """z ~ q(z | x, s): the encoder's groups with the map clamped to s."""
    mask = torch.ones(len(x), device=x.device)
    z, _ = model.encoder.sample(x, model.decoder, gen, observed={"s": s, "s_mask": mask})
    return z


@torch.no_grad()
def _style_transfer(model: TrainedModel, x: Tensor, s: Tensor, gen: torch.Generator) -> Tensor:
    """The paper's Fig. 3: the top row the maps s_j; row i the image x_i (its style z_i ~ q(z | x_i, s_i)), then
    the means of p(x | s_j, z_i) for every j."""
    num_classes = s.shape[1]
    z = _given(model, x, s, gen)
    rows = [torch.cat([torch.ones(1, 3, *x.shape[2:]), colour(s.argmax(1), num_classes)])]
    for i in range(len(x)):
        styles = {name: value[i:i + 1].expand(len(s), *value.shape[1:]) for name, value in z.items() if name != "s"}
        images = model.decoder.x_dist({"s": s, **styles}).mean()
        rows.append(torch.cat([rgb(x[i:i + 1]), rgb(images)]))
    return torch.cat(rows)


@torch.no_grad()
def _rows(model: TrainedModel, x: Tensor, s: Tensor, gen: torch.Generator, chain_steps: int) -> Tensor:
    """The paper's Fig. 4: data x and s; the picture of p(x | s, z) (mode for Bernoulli x, mean for Gaussian) with
    z ~ q(z | x, s), and argmax q(s | x); the last two rows a pair (x, s) of the limiting chain after `chain_steps`
    steps (x the picture of p(x | s, z), s the chain's own draw from q(s | x))."""
    num_classes = s.shape[1]
    recon = sampling.output_image(model.decoder.x_dist(_given(model, x, s, gen)))
    segmented = model.encoder.segment(x).logits.argmax(1)
    chain = sampling.init_chain("random_code", decoder=model.decoder, prior=model.prior, num=len(x), generator=gen,
                                device=x.device, image_shape=tuple(x.shape[1:]))
    chain = sampling.run_chain(model.encoder, model.decoder, chain, chain_steps, gen)
    z, _ = model.encoder.sample(chain, model.decoder, gen)
    pair_x = sampling.output_image(model.decoder.x_dist(z))
    return torch.cat([rgb(x), colour(s.argmax(1), num_classes), rgb(recon), colour(segmented, num_classes),
                      rgb(pair_x), colour(z["s"].argmax(1), num_classes)])
