"""The data layer: shard manifests, the train and eval streams, and the uint8 -> float transforms.

Shards are written by `shards.py` (MNIST-sized, packed) and `convert.py` (per-sample converters), indexed
and read by `tario.py`, ordered by `stream.py`, checked by `verify.py`; the trainer uses only the names here.
Must not import models or engines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from symeq_dist.config import DataConfig
from symeq_dist.data.samples import BadSample, Sample, Schema
from symeq_dist.data.shards import (
    MANIFEST_NAME,
    read_idx,
    read_mnist_5k,
    write_fashion_mnist_shards,
    write_idx_shards,
    write_mnist_shards,
    write_shards,
)
from symeq_dist.data.stream import Batch, DataError, TrainStream, iter_eval_batches, open_train_stream
from symeq_dist.data.verify import VerifyReport, verify_shards

__all__ = [
    "BadSample", "Batch", "DataError", "Sample", "Schema", "TrainStream", "VerifyReport", "add_noise",
    "build_eval_batches", "build_train_stream", "load_manifest", "read_idx", "read_mnist_5k", "to_float",
    "verify_shards", "write_fashion_mnist_shards", "write_idx_shards", "write_mnist_shards", "write_shards",
]

_MANIFEST_KEYS = ("dataset", "image_shape", "splits")


def load_manifest(shards_dir: str | Path) -> dict[str, Any]:
    """Read `<shards_dir>/manifest.json`.

    Raises:
        FileNotFoundError: no manifest; the message names `symeq shards mnist --out DIR`.
        ValueError: the file is not a shard manifest.
    """
    path = Path(shards_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {shards_dir}: write the shards first, e.g. "
                                f"run `symeq shards mnist --out {shards_dir}`, or set data.shards")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rewrite the shards with `symeq shards`") \
            from None
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {missing}; it was not written by `symeq shards`, rewrite the shards")
    return manifest


def build_train_stream(cfg: DataConfig, *, seed: int, rank: int, world_size: int,
                       batch_size: int) -> TrainStream:
    """This rank's infinite, exactly resumable stream of `batch_size` (micro-batch) samples of `cfg.split`.

    Raises:
        FileNotFoundError: no manifest or a missing shard.
        ValueError: unknown/empty split, or fewer samples than one step (world_size x batch_size).
    """
    shards_dir = Path(cfg.shards)
    return open_train_stream(shards_dir, load_manifest(shards_dir), cfg, seed=seed, rank=rank,
                             world_size=world_size, batch_size=batch_size)


def build_eval_batches(cfg: DataConfig, *, split: str, batch_size: int) -> Iterator[Batch]:
    """Every sample of `split` exactly once, in shard order, in-process; the last batch may be short.

    Bad samples follow `cfg.bad_samples` (fail: DataError naming shard and key; skip: left out, logged).
    """
    shards_dir = Path(cfg.shards)
    return iter_eval_batches(shards_dir, load_manifest(shards_dir), split=split, batch_size=batch_size,
                             skip_bad=cfg.bad_samples == "skip")


def to_float(image: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32: {0, 1} by `image >= cfg.binarize_threshold`, or image / 255 if None."""
    if image.dtype != torch.uint8:
        raise ValueError(f"to_float expects the stream's uint8 images, got {image.dtype}")
    if cfg.binarize_threshold is None:
        return image.to(torch.float32) / 255.0
    return (image >= cfg.binarize_threshold).to(torch.float32)


def add_noise(x: torch.Tensor, cfg: DataConfig, generator: torch.Generator) -> torch.Tensor:
    """Training noise drawn from `generator` only (same device as x).

    flip: x XOR Bernoulli(noise_level) for x in {0, 1}; gaussian: x + noise_level * N(0, 1), not clipped;
    none: x unchanged (nothing drawn).
    """
    if cfg.noise == "none":
        return x
    if cfg.noise == "flip":
        flip = torch.rand(x.shape, generator=generator, device=x.device) < cfg.noise_level
        return torch.where(flip, 1.0 - x, x)
    if cfg.noise == "gaussian":
        return x + cfg.noise_level * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    raise ValueError(f"data.noise={cfg.noise!r}: choose flip, gaussian or none")
