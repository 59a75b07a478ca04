"""`symeq shards folder`: any folder of images (FFHQ-like, or one sub-folder per class) -> per-sample shards.

Lists the images, splits them with a seed and hands the records to the `convert` engine, which decodes,
crops and resizes them in worker processes. Must not import torch, models or engines.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from symeq_dist.data.schema import IMAGE_FORMATS, Sample, Schema
from symeq_dist.datasets.convert import convert
from symeq_dist.errors import InputError, MissingInput

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CROPS = ("center", "none")
RESAMPLE = "bicubic"


def write_folder_shards(root: Path, out_dir: Path, *, size: int, dataset: str = "folder", labels: bool = False,
                        crop: str = "center", grey: bool = False, image_format: str = "jpg",
                        valid_fraction: float = 0.0, seed: int = 0, samples_per_shard: int = 5000,
                        workers: int = 1, limit: int | None = None, verify: bool = False) -> dict:
    """Convert every image under `root` into `{dataset}-{train,valid}-%06d.tar` shards of size x size images.

    Images are found recursively (suffixes .jpg .jpeg .png .webp .bmp, any case) and sorted by their
    relative path, so the listing is deterministic. Symbolic links are followed (a directory reached twice
    is read once); hidden files and directories (names starting with '.') are skipped. Each image is
    rotated by its EXIF orientation, converted to RGB (alpha dropped) or, with `grey`, to L, then:
    `crop="center"` cuts the centred square of the shorter side and resizes it to size x size (bicubic);
    `crop="none"` resizes the whole image to size x size, so non-square images change aspect ratio.

    Both splits hold their images in a seeded random order (each shard mixes classes and folders); the
    `json` member of a sample names its source file and original size. The manifest's `source.listing_sha256`
    is a checksum of the sorted (relative path, file size) list: it detects added, removed, renamed or
    resized files, not edits that keep the size.

    Args:
        root: the image folder.
        out_dir: where shards and `manifest.json` go (created; an interrupted run there resumes).
        size: output height and width in pixels.
        dataset: file-name prefix and the manifest's `dataset`.
        labels: the first-level sub-folder is the class (sorted names -> ids 0..K-1, stored as
            `class_names`); an image directly in `root` is then an error.
        crop: "center" or "none", see above.
        grey: one channel (mode L) instead of RGB.
        image_format: "jpg" (quality 95) or "png" (lossless) per sample.
        valid_fraction: share of the images held out as split `valid` (per class when `labels`, at least
            one image of every class with two or more); 0 writes `train` only.
        seed: the permutation behind the split and the shard order.
        samples_per_shard: images per tar.
        workers: conversion processes.
        limit: convert only the first `limit` images of the sorted listing (smoke runs); class ids still
            come from every sub-folder.

    Returns:
        The manifest that was written.

    Raises:
        FileNotFoundError: `root` is missing or holds no images; a symbolic link is broken.
        ValueError: bad options, images directly in `root` with `labels`, or (as `ConversionError`, naming
            the shard, key and file) an image that does not decode.
    """
    root = Path(root)
    _check_options(size=size, crop=crop, image_format=image_format, valid_fraction=valid_fraction, seed=seed,
                   limit=limit)
    files = list_images(root)
    class_names = _class_names(root, files) if labels else None
    if limit is not None:
        files = files[:limit]
    targets = None
    if class_names is not None:
        ids = {name: i for i, name in enumerate(class_names)}
        targets = [ids[f.split("/", 1)[0]] for f in files]
    splits = _split(files, targets, valid_fraction=valid_fraction, seed=seed)
    channels = 1 if grey else 3
    schema = Schema(image_shape=(channels, size, size), image_format=image_format,
                    num_classes=None if class_names is None else len(class_names))
    source = {"root": str(root.resolve()), "num_files": len(files), "listing_sha256": _listing_sha256(root, files)}
    meta = {"source": source, "class_names": class_names, "seed": seed, "valid_fraction": valid_fraction,
            "limit": limit,
            "preprocess": {"crop": crop, "size": size, "resample": RESAMPLE, "mode": "L" if grey else "RGB",
                           "exif_transpose": True}}
    make_sample = FolderSampler(root=str(root.resolve()), size=size, crop=crop, grey=grey)
    return convert(out_dir, dataset=dataset, splits=splits, make_sample=make_sample, schema=schema,
                   samples_per_shard=samples_per_shard, workers=workers, meta=meta,
                   verify=verify)


def _check_options(*, size: int, crop: str, image_format: str, valid_fraction: float, seed: int,
                   limit: int | None) -> None:
    if crop not in CROPS:
        raise InputError(f"crop {crop!r} is unknown: use 'center' (square centre crop, then resize) or 'none' "
                         "(resize only)")
    if size < 1:
        raise InputError(f"size must be >= 1 pixel, got {size}")
    if image_format not in IMAGE_FORMATS:
        raise InputError(f"image_format {image_format!r}: choose one of {', '.join(IMAGE_FORMATS)}")
    if not 0.0 <= valid_fraction < 1.0:
        raise InputError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1 (or None for every image), got {limit}")


def list_images(root: Path) -> list[str]:
    """Relative POSIX paths of the images under `root`, sorted; links followed, hidden entries skipped.

    Raises:
        FileNotFoundError: `root` is not a directory, holds no image, or an image link is broken.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingInput(f"image folder {root} not found; pass the directory that holds the images")
    found, seen = [], {os.path.realpath(root)}
    for here, dirs, names in os.walk(root, followlinks=True):
        keep = []
        for name in sorted(dirs):
            real = os.path.realpath(os.path.join(here, name))
            if not name.startswith(".") and real not in seen:  # `seen` also stops symlink loops
                seen.add(real)
                keep.append(name)
        dirs[:] = keep
        base = Path(here).relative_to(root)
        found += [(base / name).as_posix() for name in names
                  if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)]
    for rel in found:
        if not (root / rel).exists():
            raise MissingInput(f"{root / rel} is a broken symbolic link; fix or delete it")
    if not found:
        raise MissingInput(f"no images ({' '.join(IMAGE_SUFFIXES)}) under {root}; point ROOT at a folder "
                                "of images (searched recursively; hidden files and folders are skipped)")
    return sorted(found)


def _class_names(root: Path, files: list[str]) -> list[str]:
    """Sorted first-level sub-folder names of `files` (ids 0..K-1); images directly in `root` are an error."""
    loose = [f for f in files if "/" not in f]
    if loose:
        shown = ", ".join(loose[:5]) + (f" (+{len(loose) - 5} more)" if len(loose) > 5 else "")
        raise InputError(f"with labels, every image must sit in a class sub-folder of {root}, but {len(loose)} "
                         f"lie directly in it: {shown}; move them into a class folder or drop --labels")
    return sorted({f.split("/", 1)[0] for f in files})


def _split(files: list[str], targets: list[int] | None, *, valid_fraction: float,
           seed: int) -> dict[str, list[list[Any]]]:
    """Records [relative path, class id or None] per split, each split in seeded random order."""
    order = np.random.default_rng(seed).permutation(len(files))
    groups = np.zeros(len(files), dtype=np.int64) if targets is None else np.asarray(targets)
    valid = np.zeros(len(files), dtype=bool)
    if valid_fraction > 0:
        for group in np.unique(groups):
            members = order[groups[order] == group]
            count = min(max(round(valid_fraction * len(members)), 1), len(members) - 1)
            valid[members[:count]] = True
        if not valid.any():
            raise InputError(f"valid_fraction {valid_fraction} leaves no validation image among {len(files)} "
                             "(every class needs at least 2 images); add images or use valid_fraction 0")
    records = {"train": order[~valid[order]], "valid": order[valid[order]]}
    return {split: [[files[i], None if targets is None else targets[i]] for i in indices]
            for split, indices in records.items() if split == "train" or valid_fraction > 0}


def _listing_sha256(root: Path, files: list[str]) -> str:
    """sha256 of the sorted [[relative path, size in bytes], ...] JSON: a listing checksum, not a content one."""
    listing = [[rel, (root / rel).stat().st_size] for rel in files]
    return hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class FolderSampler:
    """`make_sample` of the folder converter: record [relative path, class id or None] -> `Sample`."""

    root: str
    size: int
    crop: str
    grey: bool

    def __call__(self, record: list[Any]) -> Sample:
        rel, target = record
        path = Path(self.root) / rel
        try:
            with Image.open(path) as opened:
                image = ImageOps.exif_transpose(opened).convert("L" if self.grey else "RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise InputError(f"{path} is not a readable image ({type(err).__name__}: {err}); replace or delete "
                             "the file") from None
        width, height = image.size
        array = np.asarray(preprocess(image, size=self.size, crop=self.crop))
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # (C, H, W)
        return Sample(image=np.ascontiguousarray(array), label=target,
                      meta={"file": rel, "source_size": [width, height]})


def preprocess(image: Image.Image, *, size: int, crop: str) -> Image.Image:
    """Centre-crop the square of the shorter side (`crop="center"`) or not ("none"), then resize bicubic."""
    if crop == "center":
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), Image.Resampling.BICUBIC)
