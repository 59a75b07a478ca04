"""The dataset's own network as the feature network of FD-clf (METHOD.md §13.2): trained here on the shards'
training split, its penultimate layer embeds images; its file's sha256 names the distance (`FD-clf-<sha256[:8]>`).

Every schema gets one (`targets.py` chooses what it learns from the manifest): class labels -> the class (softmax);
attributes (CelebA, CelebAMask-HQ) -> the attributes, multi-label; a mask without labels (digits-seg) -> the mask
classes present, multi-label; nothing (plain folders) -> self-supervised rotation prediction. All four are small
conv classifiers (features, then a softmax or sigmoid head), hence the one name; the checkpoint, `info()` and the
report's `fd_networks` name the target. Class-label networks are trained and saved exactly as before (same bytes).
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
from torch import Tensor, nn
from tqdm import tqdm

from symeq_dist.config import DataConfig
from symeq_dist.data import build_eval_batches, build_train_stream, load_manifest, to_float
from symeq_dist.data.manifest import samples_per_member
from symeq_dist.errors import InputError, MissingInput
from symeq_dist.eval.features.base import FeatureExtractor, freeze, load_file, quantise_8bit, save_atomic, sha256
from symeq_dist.eval.features.targets import FeatureTarget, count_correct, feature_target, inputs_and_targets, loss

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
# Training time per image pixel and epoch on one thread, for the estimate announced before an automatic training;
# measured on a busy shared 2-core CPU, one epoch with its accuracy pass: MNIST-5k (4,500 x 28 x 28, "flat")
# 2.6-5.9 s, i.e. 0.7-1.7e-6 s; 2,000 digits-seg canvases (64 x 64, "pooled") 10.7-12.9 s, i.e. 1.3-1.6e-6 s.
SECONDS_PER_PIXEL = 1.5e-6


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3 x 3 conv, batch norm, ReLU, 2 x 2 max pool: halves height and width."""
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(),
            nn.MaxPool2d(2)]


class _ConvClassifier(nn.Module):
    """Conv-BN-ReLU-pool blocks and a `feature_dim` hidden layer; `body` ends in the feature layer.

    `architecture` "flat" (class targets): two blocks, flattened (~0.2M parameters for MNIST: 5 epochs on MNIST-5k
    take seconds on two CPU cores). "pooled" (every other target): three blocks and a global max pool, so its
    features do not depend on where in the image a pattern is and its size not on the image size. Measured on
    64 x 64 digits-seg canvases (3,000 train, 5 epochs): "flat" never left the all-absent answer (0.81 per-output
    accuracy, loss flat at 0.45), "pooled" reached 0.90; rotation prediction 0.49 vs 0.66 after 3 epochs.
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, feature_dim: int,
                 architecture: str = "flat") -> None:
        super().__init__()
        channels, height, width = image_shape
        smallest = {"flat": 4, "pooled": 8}.get(architecture)
        if smallest is None:
            raise InputError(f"unknown feature-network architecture {architecture!r} (flat or pooled)")
        if height < smallest or width < smallest:
            raise InputError(f"the feature network needs images of at least {smallest} x {smallest} pixels, "
                             f"got {image_shape}")
        blocks = [*_conv_block(channels, 16), *_conv_block(16, 32)]  # (B, 32, H/4, W/4)
        if architecture == "flat":
            tail = [nn.Flatten(), nn.Linear(32 * (height // 4) * (width // 4), feature_dim), nn.ReLU()]
        else:
            blocks += _conv_block(32, 64)  # (B, 64, H/8, W/8)
            tail = [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, feature_dim), nn.ReLU()]
        self.body = nn.Sequential(*blocks, *tail)  # (B, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))  # (B, num_classes) logits


class ClassifierFeatures(FeatureExtractor):
    """The penultimate layer (after its ReLU) of a network trained with `train_classifier`; `target` names what it
    learned ("class", "attributes", "mask_classes" or "rotation").

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
        self.accuracy_split = str(meta.get("accuracy_split", "valid"))
        self.dataset, self.epochs, self.seed = str(meta["dataset"]), int(meta["epochs"]), int(meta["seed"])
        self.feature_target = FeatureTarget.from_checkpoint(meta)
        self.target = self.feature_target.kind

    def forward(self, images: Tensor) -> Tensor:
        return self.net.body(self._check(images))  # (B, dim)

    def classify(self, images: Tensor) -> Tensor:
        """The head's logits (B, K) of the same images: class logits for a "class" target (argmax = class id),
        per-output logits for multi-label targets (> 0: present), rotation logits for "rotation"."""
        return self.net(self._check(images))

    def info(self) -> dict[str, Any]:
        """Reported beside every distance; `valid_accuracy` is measured on `accuracy_split` (per image and output
        for multi-label targets)."""
        target = self.feature_target
        return {**super().info(), "kind": "classifier", "target": target.kind, "target_names": list(target.names),
                "target_description": target.describe(), "valid_accuracy": self.valid_accuracy,
                "accuracy_split": self.accuracy_split, "dataset": self.dataset, "epochs": self.epochs,
                "seed": self.seed}

    def _check(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise InputError(f"{self.name} embeds images of shape (B, {', '.join(map(str, self.image_shape))}) "
                             f"in [0, 1], got {tuple(images.shape)}: pass images of the classifier's dataset")
        return quantise_8bit(images)  # the classifier only ever saw [0, 1] on the 1/255 grid; data pass unchanged


def train_classifier(shards_dir: str | Path, out_path: str | Path, *, epochs: int = 5, seed: int = 0,
                     batch_size: int = 128, feature_dim: int = 128, num_threads: int | None = 1,
                     progress: bool = True) -> dict:
    """Train the FD-clf network on the shards' "train" split; save its checkpoint atomically to `out_path`.

    The target follows the manifest (`targets.feature_target`: class, attributes, mask classes present, or
    rotation). Images are grey values / 255, never binarised, so data and model samples (binary or mean images)
    are both in its input range. The split is streamed (`build_train_stream`: uint8 batches in a seeded, shuffled
    order; an epoch is num_train // batch_size steps, the few samples left over differ from epoch to epoch), so
    memory stays bounded by a batch and the reader's block cache, whatever the split's size; a split smaller than
    `batch_size` is trained in batches of the whole split. Accuracy is measured on the whole "valid" split, or on
    the "train" split when there is none (`accuracy_split` says which). Deterministic under `seed` on CPU for a
    given thread count: same seed, same bytes, same sha256. Class-label networks are saved exactly as before
    targets existed (same keys, same bytes, same name).

    Args:
        num_threads: torch intra-op threads while training (None: torch's default, the machine's cores).
            1 by default: the bytes (so the FD-clf name) then do not depend on the core count (they do
            otherwise), and on a busy shared CPU one thread was measured 1.3-1.7 s per MNIST-5k epoch, two
            0.9-35 s (2 cores, other jobs running); with free cores more threads are faster.

    Returns:
        {"path", "sha256", "name", "target", "target_description", "valid_accuracy", "accuracy_split", "epochs",
        "seed", "num_train", "num_valid", "seconds"}.

    Raises:
        FileNotFoundError: no manifest in `shards_dir` (write the shards first).
        ValueError: the shards lack a non-empty "train" split, or bad epochs/batch_size/feature_dim/num_threads.
    """
    if epochs < 1 or batch_size < 1 or feature_dim < 1 or (num_threads is not None and num_threads < 1):
        raise InputError(f"epochs={epochs}, batch_size={batch_size}, feature_dim={feature_dim}, "
                         f"num_threads={num_threads}: all must be >= 1")
    start = time.perf_counter()
    manifest = load_manifest(shards_dir)
    image_shape, target = tuple(manifest["image_shape"]), feature_target(manifest)
    num_train, num_valid = _split_sizes(shards_dir, manifest)
    if num_train < batch_size:
        log.info("the 'train' split of %s holds %d samples, fewer than one batch of %d: batches of %d", shards_dir,
                 num_train, batch_size, num_train)
        batch_size = num_train
    accuracy_split = "valid" if num_valid else "train"
    # the float conversion is to_float's with these settings: uint8 / 255, never binarised, no noise
    cfg = DataConfig(shards=str(shards_dir), binarize_threshold=None, noise="none", num_workers=STREAM_WORKERS,
                     shuffle_buffer=SHUFFLE_BLOCKS * samples_per_member(manifest))
    with _torch_threads(num_threads), torch.random.fork_rng(devices=[]):  # the caller's RNG state is left alone
        torch.manual_seed(seed)
        net = _ConvClassifier(image_shape, len(target.names), feature_dim, architecture=_architecture(target))
        _fit(net, cfg, target, steps=epochs * (num_train // batch_size), batch_size=batch_size, seed=seed,
             progress=progress)
        accuracy = _accuracy(net, cfg, target, accuracy_split, batch_size)
    checkpoint = {"state_dict": net.state_dict(), "image_shape": list(image_shape), "num_classes": len(target.names),
                  "feature_dim": feature_dim, "valid_accuracy": accuracy, "epochs": epochs, "seed": seed,
                  "dataset": str(manifest["dataset"])}
    if target.kind != "class":  # only new keys where they say something: class networks keep their bytes
        checkpoint["target"], checkpoint["architecture"] = target.to_checkpoint(), _architecture(target)
    if accuracy_split != "valid":
        checkpoint["accuracy_split"] = accuracy_split
    out_path = Path(out_path)
    save_atomic(checkpoint, out_path)
    sha = sha256(out_path)
    seconds = time.perf_counter() - start
    log.info("feature network %s (%s): %s accuracy %.4f after %d epochs (%.1f s) -> %s", sha[:8], target.describe(),
             accuracy_split, accuracy, epochs, seconds, out_path)
    return {"path": str(out_path), "sha256": sha, "name": f"FD-clf-{sha[:8]}", "target": target.kind,
            "target_description": target.describe(), "valid_accuracy": accuracy, "accuracy_split": accuracy_split,
            "epochs": epochs, "seed": seed, "num_train": num_train, "num_valid": num_valid, "seconds": seconds}


def _architecture(target: FeatureTarget) -> str:
    """"flat" for class labels (the original network: same bytes, same names), "pooled" for the other targets."""
    return "flat" if target.kind == "class" else "pooled"


def estimate_seconds(shards_dir: str | Path, epochs: int) -> float:
    """A rough training time of `train_classifier` on one thread (SECONDS_PER_PIXEL x train pixels x epochs)."""
    manifest = load_manifest(shards_dir)
    _, height, width = manifest["image_shape"]
    num_train = int(manifest["splits"].get("train", {}).get("num_samples", 0))
    return epochs * num_train * height * width * SECONDS_PER_PIXEL


def describe_target(shards_dir: str | Path) -> str:
    """What a network trained on these shards would learn, in words (`FeatureTarget.describe`)."""
    return feature_target(load_manifest(shards_dir)).describe()


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


def _split_sizes(shards_dir: str | Path, manifest: dict[str, Any]) -> tuple[int, int]:
    """Sample counts of "train" (required, non-empty) and "valid" (0 when the shards have none)."""
    splits = manifest["splits"]
    if "train" not in splits:
        raise InputError(f"the shards in {shards_dir} have no 'train' split (they have {sorted(splits)}); the "
                         "feature network trains on 'train': rewrite the shards with `symeq shards ...`")
    num_train = int(splits["train"].get("num_samples", 0))
    if num_train < 1:
        raise InputError(f"the 'train' split of {shards_dir} is empty; rewrite the shards")
    return num_train, int(splits.get("valid", {}).get("num_samples", 0))


def _fit(net: nn.Module, cfg: DataConfig, target: FeatureTarget, *, steps: int, batch_size: int, seed: int,
         progress: bool) -> None:
    """Adam (lr 2e-3) on the target's loss over `steps` batches of the seeded training stream (closed at the end)."""
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    with build_train_stream(cfg, seed=seed, rank=0, world_size=1, batch_size=batch_size) as stream, \
            tqdm(total=steps, desc=f"feature network ({target.kind})", unit="step", disable=not progress) as bar:
        for step, batch in zip(range(steps), stream, strict=False):
            x, y = inputs_and_targets(target, to_float(batch["image"], cfg), batch, step)  # x (B, C, H, W) in [0, 1]
            value = loss(target, net(x), y)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{value.item():.3f}", refresh=False)
            bar.update()
    net.eval()


@torch.no_grad()
def _accuracy(net: nn.Module, cfg: DataConfig, target: FeatureTarget, split: str, batch_size: int) -> float:
    """Accuracy on the whole `split`, read in shard order in training-sized batches (bounded memory)."""
    correct = total = 0
    for step, batch in enumerate(build_eval_batches(cfg, split=split, batch_size=batch_size)):
        x, y = inputs_and_targets(target, to_float(batch["image"], cfg), batch, step)
        right, count = count_correct(target, net(x), y)
        correct, total = correct + right, total + count
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
                              int(checkpoint["feature_dim"]), architecture=str(checkpoint.get("architecture", "flat")))
        net.load_state_dict(checkpoint["state_dict"])
        features = ClassifierFeatures(net, checkpoint, sha256(path))
    except (RuntimeError, TypeError, ValueError, KeyError) as err:
        raise InputError(f"{path} does not fit the classifier architecture ({err}); {TRAIN_FEATURES_HINT}") \
            from None
    features.path = str(path)
    return freeze(features)
