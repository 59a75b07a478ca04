"""What the FD-clf feature network learns to predict, chosen from the shards' manifest: one target per schema.

    class labels                 -> the class (softmax, cross-entropy): METHOD.md §13.2's classifier
    attributes (CelebA, and CelebAMask-HQ, whose attributes win over its mask)
                                 -> every attribute, multi-label (sigmoid, binary cross-entropy)
    a mask without labels (digits-seg, CelebAMask-HQ without attributes)
                                 -> which mask classes occur in the image, multi-label (sigmoid, BCE); an id named
                                    "background" is left out (it is in almost every image)
    nothing (plain folders)      -> self-supervised: which of 4 rotations was applied (softmax, cross-entropy)

Rotation prediction (Gidaris et al. 2018, "RotNet") is the self-supervised target because it needs nothing but the
images, trains the same kind of small classifier with a cross-entropy loss at the cost per step of the supervised
targets (each image gets one rotation, k = (index + step) mod 4: deterministic, balanced, no extra RNG), and its
penultimate features must describe shape and layout to tell up from down: what a Fréchet distance between sample
sets should compare. An autoencoder's bottleneck, the other cheap option, is driven by pixel intensities and needs a
decoder as large as the encoder. Non-square images cannot be rotated by 90 degrees in place; they get the four
shape-keeping transforms (identity, both flips, 180 degrees).
Must not import models, runtime or train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from symeq_dist.errors import InputError

KINDS = ("class", "attributes", "mask_classes", "rotation")
ROTATIONS = ("0", "90", "180", "270")
FLIPS = ("identity", "flip-vertical", "flip-horizontal", "180")  # non-square images: shape-keeping transforms
BACKGROUND = "background"


@dataclass(frozen=True)
class FeatureTarget:
    """One output of the network's head per name; `mask_ids` are the mask values of a mask_classes target."""

    kind: str
    names: tuple[str, ...]
    mask_ids: tuple[int, ...] = ()
    square: bool = True
    """rotation: the images are square (4 rotations) or not (flips)."""

    @property
    def multi_label(self) -> bool:
        return self.kind in ("attributes", "mask_classes")

    def describe(self) -> str:
        """One line for logs and reports, e.g. "10 classes (softmax, cross-entropy)"."""
        k = len(self.names)
        return {"class": f"{k} classes (softmax, cross-entropy)",
                "attributes": f"{k} attributes, multi-label (sigmoid, binary cross-entropy)",
                "mask_classes": f"{k} classes present in the mask, multi-label (sigmoid, binary cross-entropy)",
                "rotation": "self-supervised: which of 4 " + ("rotations" if self.square else "flips/rotations")
                            + " was applied (softmax, cross-entropy)"}[self.kind]

    def to_checkpoint(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": list(self.names), "mask_ids": list(self.mask_ids), "square": self.square}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> FeatureTarget:
        """The target stored in a checkpoint; files without one (before targets existed) learned classes."""
        stored = checkpoint.get("target")
        if stored is None:
            return cls("class", tuple(str(k) for k in range(int(checkpoint["num_classes"]))))
        if not isinstance(stored, dict) or stored.get("kind") not in KINDS:
            raise InputError(f"unknown feature-network target {stored!r} (known: {', '.join(KINDS)})")
        return cls(str(stored["kind"]), tuple(map(str, stored["names"])), tuple(map(int, stored.get("mask_ids", ()))),
                   bool(stored.get("square", True)))


def feature_target(manifest: dict[str, Any]) -> FeatureTarget:
    """The target for shards with this manifest (see the module docstring for the order of preference)."""
    label = manifest.get("label", {"kind": "class", "num_classes": manifest.get("num_classes", 0)})  # v1: classes
    kind = None if label is None else label.get("kind")
    if kind == "class":
        num = int(label.get("num_classes") or manifest.get("num_classes") or 0)
        if num < 1:
            raise InputError(f"the manifest's label says class labels but num_classes is {num}; rewrite the shards")
        names = manifest.get("class_names") or [str(k) for k in range(num)]
        return FeatureTarget("class", tuple(map(str, names)))
    if kind == "attributes":
        return FeatureTarget("attributes", tuple(map(str, label["names"])))
    mask = manifest.get("mask")
    if mask is not None:
        ids = tuple(i for i, name in enumerate(mask["names"]) if name != BACKGROUND)
        return FeatureTarget("mask_classes", tuple(str(mask["names"][i]) for i in ids), mask_ids=ids)
    _, height, width = manifest["image_shape"]
    return FeatureTarget("rotation", ROTATIONS if height == width else FLIPS, square=height == width)


def inputs_and_targets(target: FeatureTarget, x: Tensor, batch: dict[str, Any], step: int) -> tuple[Tensor, Tensor]:
    """The network's input and the loss's target for one batch: x (B, C, H, W) float in [0, 1].

    Returns int64 (B,) class ids (class, rotation) or float32 (B, K) 0/1 targets (multi-label).
    """
    if target.kind == "class":
        return x, batch["label"].to(torch.int64)
    if target.kind == "attributes":
        return x, batch["label"].to(torch.float32)  # (B, A) 0/1
    if target.kind == "mask_classes":
        ids = torch.tensor(target.mask_ids, dtype=torch.uint8).view(1, -1, 1)  # (1, K, 1)
        return x, (batch["mask"].flatten(1).unsqueeze(1) == ids).any(2).to(torch.float32)  # (B, K): id occurs
    turns = (torch.arange(len(x)) + step) % 4  # (B,) which transform each image gets
    return torch.stack([_transform(image, int(k), target.square) for image, k in zip(x, turns, strict=True)]), turns


def _transform(image: Tensor, k: int, square: bool) -> Tensor:
    """image (C, H, W) rotated by k * 90 degrees (square), or identity / flips / 180 degrees (non-square)."""
    if square:
        return torch.rot90(image, k, dims=(1, 2))
    return (image, image.flip(1), image.flip(2), image.flip(1, 2))[k]


def loss(target: FeatureTarget, logits: Tensor, y: Tensor) -> Tensor:
    """Binary cross-entropy per output (multi-label) or cross-entropy (one class per image)."""
    if target.multi_label:
        return F.binary_cross_entropy_with_logits(logits, y)
    return F.cross_entropy(logits, y)


def count_correct(target: FeatureTarget, logits: Tensor, y: Tensor) -> tuple[int, int]:
    """(correct, total) predictions: per image (argmax), or per image and output (logit > 0) for multi-label."""
    if target.multi_label:
        return int(((logits > 0).to(y.dtype) == y).sum()), y.numel()
    return int((logits.argmax(1) == y).sum()), len(y)
