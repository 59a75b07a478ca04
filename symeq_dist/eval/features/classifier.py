"""The dataset's own classifier as the feature network of FD-clf (METHOD.md §13.2): trained here on the shards'
training split, its penultimate layer embeds images; its file's sha256 names the distance.

Must not import models, runtime or train.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from symeq_dist.config import DataConfig
from symeq_dist.data import build_eval_batches, build_train_stream, load_manifest, to_float
from symeq_dist.data.manifest import samples_per_member
from symeq_dist.errors import InputError, MissingInput
from symeq_dist.eval.features.base import FeatureExtractor, freeze, load_file, quantise_8bit, save_atomic, sha256

log = logging.getLogger(__name__)

CLASSIFIER_KEYS = ("state_dict", "image_shape", "num_classes", "feature_dim", "valid_accuracy", "epochs",
                   "seed", "dataset")
TRAIN_FEATURES_HINT = "train it with `symeq eval train-features <shards>`"
# One DataLoader worker decodes and collates the next batches while the step runs: measured faster than
# reading in the training process (MNIST-5k, 2 shared cores: 2.0-3.4 vs 2.8-5.3 s per epoch on one thread).
STREAM_WORKERS = 1
# Window of the stream's shuffle after its permutation of packed blocks, in blocks: batches mix 32 blocks
# (8192 samples at 256 per block, the default data.shuffle_buffer mixes ~4), and the reader's 64-block cache
# never has to re-read one. Per-sample shards are fully shuffled by the permutation alone.
SHUFFLE_BLOCKS = 32


class _ConvClassifier(nn.Module):
    """Two conv-BN-ReLU-pool blocks and a `feature_dim` hidden layer; `body` ends in the feature layer.

    Small on purpose (~0.2M parameters for MNIST): 5 epochs on MNIST-5k take seconds on two CPU cores.
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, feature_dim: int) -> None:
        super().__init__()
        channels, height, width = image_shape
        if height < 4 or width < 4:
            raise InputError(f"the classifier needs images of at least 4 x 4 pixels, got {image_shape}")
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, H/2, W/2)
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, H/4, W/4)
            nn.Flatten(), nn.Linear(32 * (height // 4) * (width // 4), feature_dim), nn.ReLU(),  # (B, feature_dim)
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))  # (B, num_classes) logits


class ClassifierFeatures(FeatureExtractor):
    """The penultimate layer (after its ReLU) of a classifier trained with `train_classifier`.

    Inputs are first clamped to [0, 1] and rounded to multiples of 1/255 (`quantise_8bit`), as for FID:
    the classifier was trained on such images only, so its features of out-of-range or off-grid values
    (Gaussian-x means) would be extrapolation; data (x / 255 or binary) and binary samples pass unchanged,
    and FD-clf and FID then describe the same 8-bit images.
    """

    def __init__(self, net: _ConvClassifier, meta: dict[str, Any], sha256: str) -> None:
        super().__init__()
        self.net, self.sha256 = net, sha256
        self.image_shape = tuple(meta["image_shape"])
        self.dim = int(meta["feature_dim"])
        self.name = f"FD-clf-{sha256[:8]}"
        self.valid_accuracy = float(meta["valid_accuracy"])
        self.dataset, self.epochs, self.seed = str(meta["dataset"]), int(meta["epochs"]), int(meta["seed"])

    def forward(self, images: Tensor) -> Tensor:
        return self.net.body(self._check(images))  # (B, dim)

    def classify(self, images: Tensor) -> Tensor:
        """Class logits (B, num_classes) of the same images."""
        return self.net(self._check(images))

    def info(self) -> dict[str, Any]:
        return {**super().info(), "kind": "classifier", "valid_accuracy": self.valid_accuracy, "dataset": self.dataset,
                "epochs": self.epochs, "seed": self.seed}

    def _check(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise InputError(f"{self.name} embeds images of shape (B, {', '.join(map(str, self.image_shape))}) "
                             f"in [0, 1], got {tuple(images.shape)}: pass images of the classifier's dataset")
        return quantise_8bit(images)  # the classifier only ever saw [0, 1] on the 1/255 grid; data pass unchanged


def train_classifier(shards_dir: str | Path, out_path: str | Path, *, epochs: int = 5, seed: int = 0,
                     batch_size: int = 128, feature_dim: int = 128, num_threads: int | None = 1,
                     progress: bool = True) -> dict:
    """Train the FD-clf classifier on the shards' "train" split; save its checkpoint atomically to `out_path`.

    Images are grey values / 255, never binarised, so data and model samples (binary or mean images) are both
    in its input range. The split is streamed (`build_train_stream`: uint8 batches in a seeded, shuffled order;
    an epoch is num_train // batch_size steps, the few samples left over differ from epoch to epoch), so memory
    stays bounded by a batch and the reader's block cache, whatever the split's size. Deterministic under
    `seed` on CPU for a given thread count: same seed, same bytes, same sha256.

    Args:
        num_threads: torch intra-op threads while training (None: torch's default, the machine's cores).
            1 by default: the bytes (so the FD-clf name) then do not depend on the core count (they do
            otherwise), and on a busy shared CPU one thread was measured 1.3-1.7 s per MNIST-5k epoch, two
            0.9-35 s (2 cores, other jobs running); with free cores more threads are faster.

    Returns:
        {"path", "sha256", "name", "valid_accuracy", "epochs", "seed", "num_train", "num_valid", "seconds"}.

    Raises:
        FileNotFoundError: no manifest in `shards_dir` (write the shards first).
        ValueError: the shards lack a "train" or "valid" split or class labels, the train split is smaller
            than one batch, or bad epochs/batch_size/feature_dim/num_threads.
    """
    if epochs < 1 or batch_size < 1 or feature_dim < 1 or (num_threads is not None and num_threads < 1):
        raise InputError(f"epochs={epochs}, batch_size={batch_size}, feature_dim={feature_dim}, "
                         f"num_threads={num_threads}: all must be >= 1")
    start = time.perf_counter()
    manifest = load_manifest(shards_dir)
    image_shape, num_classes = tuple(manifest["image_shape"]), int(manifest["num_classes"])
    num_train, num_valid = (_split_size(shards_dir, manifest, split) for split in ("train", "valid"))
    if num_train < batch_size:
        raise InputError(f"the 'train' split of {shards_dir} holds {num_train} samples, fewer than one batch of "
                         f"{batch_size}: lower batch_size or add data")
    # the float conversion is to_float's with these settings: uint8 / 255, never binarised, no noise
    cfg = DataConfig(shards=str(shards_dir), binarize_threshold=None, noise="none", num_workers=STREAM_WORKERS,
                     shuffle_buffer=SHUFFLE_BLOCKS * samples_per_member(manifest))
    with _torch_threads(num_threads), torch.random.fork_rng(devices=[]):  # the caller's RNG state is left alone
        torch.manual_seed(seed)
        net = _ConvClassifier(image_shape, num_classes, feature_dim)
        _fit(net, cfg, steps=epochs * (num_train // batch_size), batch_size=batch_size, seed=seed,
             progress=progress)
        accuracy = _accuracy(net, cfg, batch_size)
    checkpoint = {"state_dict": net.state_dict(), "image_shape": list(image_shape), "num_classes": num_classes,
                  "feature_dim": feature_dim, "valid_accuracy": accuracy, "epochs": epochs, "seed": seed,
                  "dataset": str(manifest["dataset"])}
    out_path = Path(out_path)
    save_atomic(checkpoint, out_path)
    sha = sha256(out_path)
    seconds = time.perf_counter() - start
    log.info("classifier %s: valid accuracy %.4f after %d epochs (%.1f s) -> %s", sha[:8], accuracy, epochs,
             seconds, out_path)
    return {"path": str(out_path), "sha256": sha, "name": f"FD-clf-{sha[:8]}", "valid_accuracy": accuracy,
            "epochs": epochs, "seed": seed, "num_train": num_train, "num_valid": num_valid, "seconds": seconds}


@contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run torch on `num_threads` intra-op threads (None: leave them), then restore the previous count."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _split_size(shards_dir: str | Path, manifest: dict[str, Any], split: str) -> int:
    """The manifest's sample count of `split`; ValueError unless it exists, is non-empty and has class labels."""
    if split not in manifest["splits"]:
        raise InputError(f"the shards in {shards_dir} have no {split!r} split (they have "
                         f"{sorted(manifest['splits'])}); the classifier trains on 'train' and reports "
                         "accuracy on 'valid': rewrite the shards with `symeq shards ...`")
    label = manifest.get("label", {"kind": "class"})
    if label is None or label.get("kind") != "class":
        raise InputError(f"the shards in {shards_dir} have no class labels (label: {label}); the FD-clf "
                         "classifier needs them: train it on labelled shards, or use FID (--inception-weights)")
    num = int(manifest["splits"][split].get("num_samples", 0))
    if num < 1:
        raise InputError(f"the {split!r} split of {shards_dir} is empty; rewrite the shards")
    return num


def _fit(net: nn.Module, cfg: DataConfig, *, steps: int, batch_size: int, seed: int, progress: bool) -> None:
    """Adam (lr 2e-3) on cross-entropy over `steps` batches of the seeded training stream (closed at the end)."""
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    with build_train_stream(cfg, seed=seed, rank=0, world_size=1, batch_size=batch_size) as stream, \
            tqdm(total=steps, desc="classifier", unit="step", disable=not progress) as bar:
        for _, batch in zip(range(steps), stream, strict=False):
            x = to_float(batch["image"], cfg)  # (B, C, H, W) in [0, 1]
            loss = F.cross_entropy(net(x), batch["label"].to(torch.int64))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
    net.eval()


@torch.no_grad()
def _accuracy(net: nn.Module, cfg: DataConfig, batch_size: int) -> float:
    """Accuracy on the whole "valid" split, read in shard order in training-sized batches (bounded memory)."""
    correct = total = 0
    for batch in build_eval_batches(cfg, split="valid", batch_size=batch_size):
        correct += int((net(to_float(batch["image"], cfg)).argmax(1) == batch["label"].to(torch.int64)).sum())
        total += len(batch["label"])
    return correct / total


def load_classifier_features(path: str | Path) -> ClassifierFeatures:
    """The penultimate-layer features of a `train_classifier` checkpoint, frozen, in eval mode.

    Raises:
        FileNotFoundError: no such file; the message names `symeq eval train-features <shards>`.
        ValueError: the file is not a classifier checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"no classifier checkpoint at {path}: {TRAIN_FEATURES_HINT} "
                                "(it writes <shards>/classifier.pt), or pass --features PATH")
    checkpoint = load_file(path, what="a classifier checkpoint", fix=TRAIN_FEATURES_HINT)
    missing = [key for key in CLASSIFIER_KEYS if key not in checkpoint]
    if missing:
        raise InputError(f"{path} is not a classifier checkpoint (it lacks {missing}); {TRAIN_FEATURES_HINT}")
    try:
        net = _ConvClassifier(tuple(checkpoint["image_shape"]), int(checkpoint["num_classes"]),
                              int(checkpoint["feature_dim"]))
        net.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, TypeError, ValueError) as err:
        raise InputError(f"{path} does not fit the classifier architecture ({err}); {TRAIN_FEATURES_HINT}") \
            from None
    features = ClassifierFeatures(net, checkpoint, sha256(path))
    features.path = str(path)
    return freeze(features)
