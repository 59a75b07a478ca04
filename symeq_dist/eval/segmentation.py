"""Segmentation metrics (issue 14, the image + segmentation model): a confusion matrix accumulated over batches,
then pixel accuracy and the mean intersection-over-union over the classes that occur.

IoU of class k = TP_k / (TP_k + FP_k + FN_k); classes with an empty union (neither predicted nor in the targets)
are left out of the mean, not counted as 0 or 1. Pure torch.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
