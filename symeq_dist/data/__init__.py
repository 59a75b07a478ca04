"""The data layer of training and evaluation: manifests, the train and eval streams, uint8 -> float.

`manifest.py` (format, checked reading), `schema.py` (what a sample holds, decoding), `tario.py` (tar index
and seeks), `stream.py` (epoch order, per-rank batches, resume, bad data), `verify.py`, `transforms.py`.
Writing shards is offline work (`symeq_dist.datasets`), never imported from here.
Must not import models, engines or datasets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from symeq_dist.config import DataConfig
from symeq_dist.data.manifest import MANIFEST_NAME, load_manifest
from symeq_dist.data.schema import BadSample, Sample, Schema
from symeq_dist.data.stream import Batch, DataError, TrainStream, iter_eval_batches, open_train_stream
from symeq_dist.data.transforms import add_noise, to_float
from symeq_dist.data.verify import VerifyReport, verify_shards

__all__ = [
    "MANIFEST_NAME", "BadSample", "Batch", "DataError", "Sample", "Schema", "TrainStream", "VerifyReport",
    "add_noise", "build_eval_batches", "build_train_stream", "load_manifest", "to_float", "verify_shards",
]


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
