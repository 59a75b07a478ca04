"""The writer of array data sets (MNIST-sized images with class labels): packed or per-sample tar shards.

Deterministic: same input, byte-identical shards. Small images are packed (blocks of samples per tar
member); large ones get one png + cls pair per sample. Offline code: never imported by a training process.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from symeq_dist.data.manifest import IMAGES_VERSION, MANIFEST_NAME, PACKED, PER_SAMPLE
from symeq_dist.datasets.common import NAME_RE, write_manifest, write_tar
from symeq_dist.errors import InputError

log = logging.getLogger(__name__)

PACKED_SAMPLES_PER_MEMBER = 256  # default block size: a tar header per 256 samples, not per sample
PACK_MAX_PIXELS = 64 * 64  # default: pack images with H * W up to this, store larger ones as png
_RESERVED_KEYS = ("format_version", "format", "samples_per_member", "dataset", "image_shape",
                  "num_classes", "splits")


def write_shards(out_dir: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], *, dataset: str,
                 samples_per_shard: int, meta: dict, samples_per_member: int | None = None) -> dict:
    """Write `{dataset}-{split}-%06d.tar` shards and `manifest.json`, in the packed or per-sample format.

    Packed (`samples_per_member` > 1): each block of up to that many consecutive samples of a shard is
    one key `<first sample key>` with members `images.npy` (uint8 (n, C, H, W)), `labels.npy` (int64 (n,))
    and `keys.json` (the n sample keys). Per-sample (`samples_per_member` == 1): members `png` (mode L or
    RGB) and `cls` (ASCII label) per sample. The manifest records `format` and `samples_per_member`.

    Shards are byte-identical for the same input (fixed tar mtime, owner and mode; npy and json bytes
    depend on the arrays only). An existing manifest is removed first and the new one is written last,
    atomically, so an interrupted run leaves none.

    Args:
        out_dir: created if missing.
        splits: split name -> (images uint8 (N, H, W) or (N, C, H, W) with C in {1, 3}, labels int (N,)).
        dataset: file-name prefix and the manifest's `dataset`.
        samples_per_shard: samples per tar; the last shard of a split may hold fewer.
        meta: extra JSON fields for the manifest (seed, source, threshold hint, command line).
        samples_per_member: samples per packed block (the last block of a shard may hold fewer), or 1
            for the per-sample png format; None packs PACKED_SAMPLES_PER_MEMBER for images with
            H * W <= PACK_MAX_PIXELS (MNIST-sized tar headers and PNG decoding cost more than the
            pixels) and writes larger images per sample.

    Returns:
        The manifest dict that was written.

    Raises:
        ValueError: bad names, shapes, dtypes, labels or meta keys.
    """
    out_dir = Path(out_dir)
    image_shape = _check_splits(splits, dataset=dataset, samples_per_shard=samples_per_shard, meta=meta)
    per_member = _samples_per_member(samples_per_member, image_shape)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_NAME
    manifest_path.unlink(missing_ok=True)  # never leave an old manifest next to half-rewritten shards
    entries = {split: _write_split(out_dir, dataset, split, _as_nchw(images), labels,
                                   samples_per_shard=samples_per_shard, samples_per_member=per_member)
               for split, (images, labels) in splits.items()}
    num_classes = max((int(np.max(labels)) + 1 for _, labels in splits.values() if len(labels)), default=0)
    manifest = {"format_version": IMAGES_VERSION, "format": PACKED if per_member > 1 else PER_SAMPLE,
                "samples_per_member": per_member, "dataset": dataset, "image_shape": list(image_shape),
                "num_classes": num_classes, "splits": entries, **meta}
    write_manifest(out_dir, manifest)
    summary = (f"{s} {e['num_samples']} samples in {len(e['shards'])} shards" for s, e in entries.items())
    log.info("wrote %s (%s, %d samples per member): %s", manifest_path, manifest["format"], per_member,
             ", ".join(summary))
    return manifest


def _samples_per_member(requested: int | None, image_shape: tuple[int, int, int]) -> int:
    """The block size to write: `requested`, or the default for `image_shape` (C, H, W) if None."""
    if requested is None:
        return PACKED_SAMPLES_PER_MEMBER if image_shape[1] * image_shape[2] <= PACK_MAX_PIXELS else 1
    if requested < 1:
        raise InputError(f"samples_per_member must be >= 1 (1 = one png + cls per sample), or None for the "
                         f"default, got {requested}")
    return requested


def _check_splits(splits: dict[str, tuple[np.ndarray, np.ndarray]], *, dataset: str,
                  samples_per_shard: int, meta: dict) -> tuple[int, int, int]:
    """Validate the writer's input; return the common image shape (C, H, W)."""
    if not NAME_RE.match(dataset) or not splits or not all(NAME_RE.match(s) for s in splits):
        raise InputError(f"dataset {dataset!r} and split names {list(splits)} must be non-empty and use only "
                         "letters, digits, '_' and '-' (they become file names)")
    if samples_per_shard < 1:
        raise InputError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    clash = sorted(set(meta) & set(_RESERVED_KEYS))
    if clash:
        raise InputError(f"meta keys {clash} are written by write_shards itself; rename them")
    json.dumps(meta)  # raises TypeError early for non-JSON meta, before any shard is written
    shapes = set()
    for split, (images, labels) in splits.items():
        labels = np.asarray(labels)
        channels_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[1] in (1, 3))
        if images.dtype != np.uint8 or not channels_ok:
            raise InputError(f"split {split}: images must be uint8 (N, H, W) or (N, C, H, W) with C in "
                             f"{{1, 3}}, got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"split {split}: labels must be integers of shape ({len(images)},), "
                             f"got {labels.dtype} {labels.shape}")
        if len(labels) and labels.min() < 0:
            raise InputError(f"split {split}: labels must be >= 0, found {labels.min()}")
        shapes.add(_as_nchw(images).shape[1:])
    if len(shapes) != 1:
        raise InputError(f"all splits must share one image shape, got {sorted(shapes)}")
    return shapes.pop()


def _as_nchw(images: np.ndarray) -> np.ndarray:
    return images[:, None] if images.ndim == 3 else images


def _write_split(out_dir: Path, dataset: str, split: str, images: np.ndarray, labels: np.ndarray, *,
                 samples_per_shard: int, samples_per_member: int) -> dict[str, Any]:
    """Write one split's shards; keys are zero-padded sample ids within the split."""
    num = len(images)
    width = max(6, len(str(max(num - 1, 0))))
    shards = []
    with tqdm(total=num, desc=f"{dataset}/{split}", unit="img", leave=False,
              disable=not sys.stderr.isatty()) as bar:
        for index, start in enumerate(range(0, num, samples_per_shard)):
            stop = min(start + samples_per_shard, num)
            name = f"{dataset}-{split}-{index:06d}.tar"
            keys = [f"{i:0{width}d}" for i in range(start, stop)]
            digest = _write_tar(out_dir / name, keys, images[start:stop], labels[start:stop],
                                samples_per_member=samples_per_member)
            shards.append({"name": name, "num_samples": stop - start, "sha256": digest})
            bar.update(stop - start)
    stale = sorted(p.name for p in out_dir.glob(f"{dataset}-{split}-*.tar")
                   if p.name not in {s["name"] for s in shards})
    if stale:
        log.warning("%s holds %d old shards not in the new manifest (ignored; delete them): %s",
                    out_dir, len(stale), ", ".join(stale[:5]))
    return {"num_samples": num, "shards": shards}


def _write_tar(path: Path, keys: list[str], images: np.ndarray, labels: np.ndarray, *,
               samples_per_member: int) -> str:
    """Write one tar (images (n, C, H, W)) deterministically via a temporary file; return its sha256."""
    if samples_per_member == 1:
        groups = ({"__key__": key, "png": _encode_png(image), "cls": str(int(label)).encode("ascii")}
                  for key, image, label in zip(keys, images, labels, strict=True))
    else:
        blocks = (slice(start, start + samples_per_member) for start in range(0, len(keys), samples_per_member))
        groups = ({"__key__": keys[b.start], "images.npy": _encode_npy(images[b], "|u1"),  # (n, C, H, W)
                   "labels.npy": _encode_npy(labels[b], "<i8"),  # (n,)
                   "keys.json": json.dumps(keys[b]).encode("ascii")} for b in blocks)
    return write_tar(path, groups)


def _encode_png(image: np.ndarray) -> bytes:
    """(C, H, W) uint8 -> PNG bytes, mode L for one channel and RGB for three."""
    array = image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _encode_npy(array: np.ndarray, dtype: str) -> bytes:
    """.npy bytes of a C-ordered copy with a fixed byte order: the header and data depend on the values only."""
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array, dtype=np.dtype(dtype)), allow_pickle=False)
    return out.getvalue()
