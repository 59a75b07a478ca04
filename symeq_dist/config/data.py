"""Where the training data comes from and how it is turned into x (the stream is `symeq_dist.data`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from symeq_dist.config.base import check


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    shards: str = "data_shards/mnist"
    """Directory with `manifest.json` and the tar shards (written by `symeq shards mnist`)."""
    split: str = "train"
    """Split used for training."""
    eval_split: str = "valid"
    """Held-out split used for the data and reconstruction grids."""
    binarize_threshold: int | None = 112
    """Pixels with uint8 value >= threshold become 1 (112 == x > 0.4375); null keeps grey values / 255."""
    noise: Literal["flip", "gaussian", "none"] = "flip"
    """Training noise, fresh each iteration: pixel flips (binary data) or additive Gaussian."""
    noise_level: float = 0.001
    """Flip probability (flip) or standard deviation (gaussian)."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 reads in the training process)."""
    shuffle_buffer: int = 1000
    """Window of the epoch order within which samples are shuffled (after the shard/block permutation)."""
    bad_samples: Literal["fail", "skip"] = "fail"
    """A corrupt or missing sample: fail (error naming shard and key) or skip (dropped, counted in data/skipped)."""
    labels_per_class: int = 0
    """Semi-supervised runs (a model with a class latent, `model.kind: class_mlp`): the labelled pool holds this many
    training samples of every class (-1: every sample); 0 = no labels (data/labelled.py)."""
    labelled_fraction: float = 0.0
    """Image + segmentation runs (`model.kind: seg_hvae`): this fraction of the training split keeps its label map
    (the labelled pool; the others are used as unlabelled images); 0 = no label maps. The pool is the same for
    every run seed (a fixed priority order of the split), so runs with different seeds share their labels."""
    labelled_batch_size: int = 128
    """Labelled rows per step over all ranks (drawn with replacement from the pool), besides train.batch_size."""

    def __post_init__(self) -> None:
        if self.binarize_threshold is not None:
            check(0 < self.binarize_threshold <= 255, "data.binarize_threshold", "must be in 1..255 or null")
        check(self.noise_level >= 0, "data.noise_level", "must be >= 0")
        check(self.labels_per_class >= -1, "data.labels_per_class", "must be >= 0, or -1 for every sample")
        check(0.0 <= self.labelled_fraction <= 1.0, "data.labelled_fraction", "must be in [0, 1]")
        check(self.labelled_batch_size >= 1, "data.labelled_batch_size", "must be >= 1")
        if self.noise == "flip":
            check(self.noise_level <= 0.5, "data.noise_level", "a flip probability must be <= 0.5")
            check(self.binarize_threshold is not None, "data.noise",
                   "flip noise needs binary data: set data.binarize_threshold or use data.noise=gaussian")
        check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        check(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
