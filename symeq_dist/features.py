"""Feature networks for Fréchet distances (METHOD.md §13.2): the dataset's own classifier and the FID InceptionV3.

The classifier is trained here on the shards' training split (FD-clf); InceptionV3 is pytorch-fid's FID network,
re-implemented in plain torch and loaded only from a local weights file: nothing is ever downloaded.
Must not import models, engines, dist or evaluate.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from symeq_dist.config import DataConfig
from symeq_dist.data import build_eval_batches, load_manifest, to_float
from symeq_dist.fd import single_thread

log = logging.getLogger(__name__)
_Extractor = TypeVar("_Extractor", bound="FeatureExtractor")

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SIZE = 299  # pytorch-fid resizes every input to 299 x 299 (bilinear, align_corners=False)
INCEPTION_DIM = 2048  # pool3: Mixed_7c averaged over its 8 x 8 map
INCEPTION_CLASSES = 1008  # the TF 2015-12-05 graph has 1008 logits (1000 ImageNet classes + 8 unused)
CLASSIFIER_KEYS = ("state_dict", "image_shape", "num_classes", "feature_dim", "valid_accuracy", "epochs",
                   "seed", "dataset")
TRAIN_FEATURES_HINT = "train it with `symeq eval train-features <shards>`"
_OPTIONAL_SUFFIX = ".num_batches_tracked"  # BatchNorm counters: absent from old checkpoints, unused in eval
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
                zipfile.BadZipFile, UnicodeDecodeError)


class FeatureExtractor(nn.Module):
    """A frozen network mapping images float (B, C, H, W) in [0, 1] to features (B, dim) float32.

    `name` is what reports call the distance ("FID", "FD-clf-<sha256[:8]>"); `sha256` and `path` are the
    weights file's (None for a randomly initialised network).
    """

    name: str
    dim: int
    sha256: str | None = None
    path: str | None = None

    def forward(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """What a report stores beside every distance measured in these features."""
        return {"name": self.name, "dim": self.dim, "sha256": self.sha256, "path": self.path}


# ---------------------------------------------------------------- the dataset's classifier (FD-clf)

class _ConvClassifier(nn.Module):
    """Two conv-BN-ReLU-pool blocks and a `feature_dim` hidden layer; `body` ends in the feature layer.

    Small on purpose (~0.2M parameters for MNIST): 5 epochs on MNIST-5k take seconds on two CPU cores.
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, feature_dim: int) -> None:
        super().__init__()
        channels, height, width = image_shape
        if height < 4 or width < 4:
            raise ValueError(f"the classifier needs images of at least 4 x 4 pixels, got {image_shape}")
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, H/2, W/2)
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, H/4, W/4)
            nn.Flatten(), nn.Linear(32 * (height // 4) * (width // 4), feature_dim), nn.ReLU(),  # (B, feature_dim)
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))  # (B, num_classes) logits


class ClassifierFeatures(FeatureExtractor):
    """The penultimate layer (after its ReLU) of a classifier trained with `train_classifier`."""

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
            raise ValueError(f"{self.name} embeds images of shape (B, {', '.join(map(str, self.image_shape))}) "
                             f"in [0, 1], got {tuple(images.shape)}: pass images of the classifier's dataset")
        return images.to(torch.float32)


def train_classifier(shards_dir: str | Path, out_path: str | Path, *, epochs: int = 5, seed: int = 0,
                     batch_size: int = 128, feature_dim: int = 128, progress: bool = True) -> dict:
    """Train the FD-clf classifier on the shards' "train" split; save its checkpoint atomically to `out_path`.

    Images are grey values / 255, never binarised, so data and model samples (binary or mean images) are both
    in its input range. Deterministic under `seed` on CPU: same seed, same bytes, same sha256 (it trains on
    one thread, so the core count does not change the result).

    Returns:
        {"path", "sha256", "name", "valid_accuracy", "epochs", "seed", "num_train", "num_valid", "seconds"}.

    Raises:
        FileNotFoundError: no manifest in `shards_dir` (write the shards first).
        ValueError: the shards lack a "train" or "valid" split, or bad epochs/batch_size/feature_dim.
    """
    if epochs < 1 or batch_size < 1 or feature_dim < 1:
        raise ValueError(f"epochs={epochs}, batch_size={batch_size}, feature_dim={feature_dim}: all must be >= 1")
    start = time.perf_counter()
    manifest = load_manifest(shards_dir)
    image_shape, num_classes = tuple(manifest["image_shape"]), int(manifest["num_classes"])
    x_train, y_train = _read_split(shards_dir, manifest, "train")
    x_valid, y_valid = _read_split(shards_dir, manifest, "valid")
    with single_thread(), torch.random.fork_rng(devices=[]):  # the caller's global RNG state is left alone
        torch.manual_seed(seed)
        net = _ConvClassifier(image_shape, num_classes, feature_dim)
        _fit(net, x_train, y_train, epochs=epochs, batch_size=batch_size, seed=seed, progress=progress)
        accuracy = _accuracy(net, x_valid, y_valid)
    checkpoint = {"state_dict": net.state_dict(), "image_shape": list(image_shape), "num_classes": num_classes,
                  "feature_dim": feature_dim, "valid_accuracy": accuracy, "epochs": epochs, "seed": seed,
                  "dataset": str(manifest["dataset"])}
    out_path = Path(out_path)
    _save_atomic(checkpoint, out_path)
    sha = _sha256(out_path)
    seconds = time.perf_counter() - start
    log.info("classifier %s: valid accuracy %.4f after %d epochs (%.1f s) -> %s", sha[:8], accuracy, epochs,
             seconds, out_path)
    return {"path": str(out_path), "sha256": sha, "name": f"FD-clf-{sha[:8]}", "valid_accuracy": accuracy,
            "epochs": epochs, "seed": seed, "num_train": len(y_train), "num_valid": len(y_valid),
            "seconds": seconds}


def _read_split(shards_dir: str | Path, manifest: dict[str, Any], split: str) -> tuple[Tensor, Tensor]:
    """A whole split in memory, in shard order: images float (N, C, H, W) in [0, 1], labels int64 (N,)."""
    if split not in manifest["splits"]:
        raise ValueError(f"the shards in {shards_dir} have no {split!r} split (they have "
                         f"{sorted(manifest['splits'])}); the classifier trains on 'train' and reports "
                         "accuracy on 'valid': rewrite the shards with `symeq shards ...`")
    label = manifest.get("label", {"kind": "class"})
    if label is None or label.get("kind") != "class":
        raise ValueError(f"the shards in {shards_dir} have no class labels (label: {label}); the FD-clf "
                         "classifier needs them: train it on labelled shards, or use FID (--inception-weights)")
    cfg = DataConfig(shards=str(shards_dir), binarize_threshold=None, noise="none")
    images, labels = [], []
    for batch in build_eval_batches(cfg, split=split, batch_size=1024):
        images.append(to_float(batch["image"], cfg))
        labels.append(batch["label"].to(torch.int64))
    if not labels:
        raise ValueError(f"the {split!r} split of {shards_dir} is empty; rewrite the shards")
    return torch.cat(images), torch.cat(labels)


def _fit(net: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int, seed: int,
         progress: bool) -> None:
    """Adam (lr 2e-3) on cross-entropy; batches drawn by a permutation per epoch from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    steps = (len(y) + batch_size - 1) // batch_size
    net.train()
    with tqdm(total=epochs * steps, desc="classifier", unit="step", disable=not progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            for index in order.split(batch_size):
                loss = F.cross_entropy(net(x[index]), y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    net.eval()


@torch.no_grad()
def _accuracy(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    batches = zip(x.split(batch_size), y.split(batch_size), strict=True)
    return sum(int((net(xb).argmax(1) == yb).sum()) for xb, yb in batches) / len(y)


def load_classifier_features(path: str | Path) -> ClassifierFeatures:
    """The penultimate-layer features of a `train_classifier` checkpoint, frozen, in eval mode.

    Raises:
        FileNotFoundError: no such file; the message names `symeq eval train-features <shards>`.
        ValueError: the file is not a classifier checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no classifier checkpoint at {path}: {TRAIN_FEATURES_HINT} "
                                "(it writes <shards>/classifier.pt), or pass --features PATH")
    checkpoint = _load_file(path, what="a classifier checkpoint", fix=TRAIN_FEATURES_HINT)
    missing = [key for key in CLASSIFIER_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(f"{path} is not a classifier checkpoint (it lacks {missing}); {TRAIN_FEATURES_HINT}")
    try:
        net = _ConvClassifier(tuple(checkpoint["image_shape"]), int(checkpoint["num_classes"]),
                              int(checkpoint["feature_dim"]))
        net.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{path} does not fit the classifier architecture ({err}); {TRAIN_FEATURES_HINT}") \
            from None
    features = ClassifierFeatures(net, checkpoint, _sha256(path))
    features.path = str(path)
    return _freeze(features)


# ---------------------------------------------------------------- pytorch-fid's InceptionV3 (FID)

class _BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 0.001) -> ReLU; state-dict keys `conv.weight`, `bn.*`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], *,
                 stride: int = 1, padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    """3x3 stride-1 average pool that, like TensorFlow's, leaves the zero padding out of the average."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _FIDInceptionA(nn.Module):
    """35 x 35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pool branches -> 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = _BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = _BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = _BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_tf_avg_pool(x))], 1)


class _InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): stride-2 3x3, double 3x3 and max-pool branches -> 768 channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = _BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _FIDInceptionC(nn.Module):
    """17 x 17 block (Mixed_6b..e) with factorised 7x7 convolutions of width c7 -> 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = _BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = _BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = _BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_tf_avg_pool(x))], 1)


class _InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 3x3 and 7x7x3 stride-2 branches and a max pool -> 1280 channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = _BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = _BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = _BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _FIDInceptionE(nn.Module):
    """8 x 8 block -> 2048 channels. Mixed_7b pools by TF average (E_1), Mixed_7c by 3x3 max pool (E_2)."""

    def __init__(self, in_channels: int, *, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = _BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = _BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = _BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        # the FID graph max-pools here in Mixed_7c (the paper and torchvision average-pool)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


class InceptionFeatures(FeatureExtractor):
    """pytorch-fid's FID InceptionV3 up to pool3: images (B, 1 or 3, H, W) in [0, 1] -> (B, 2048).

    Built with random (He) weights; `load_inception_features` fills in the real ones. `fc` (2048 -> 1008) is
    kept only so the weights file loads with strict key checking; the features never pass through it.
    pytorch-fid reads 8-bit PNGs: quantise to multiples of 1/255 first for parity with its file-based numbers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name, self.dim = "FID", INCEPTION_DIM
        self.Conv2d_1a_3x3 = _BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = _BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = _BasicConv2d(80, 192, 3)
        self.Mixed_5b = _FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = _FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = _FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = _FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = _FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = _FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = _FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(INCEPTION_DIM, INCEPTION_CLASSES)
        for module in self.modules():  # He init keeps random-init features O(1) (torch's default fades to ~1e-8)
            if isinstance(module, nn.Conv2d) and not module.weight.is_meta:  # meta: shapes only, no init
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def info(self) -> dict[str, Any]:
        return {**super().info(), "kind": "inception"}

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need images (B, 1 or 3, H, W) in [0, 1], got {tuple(images.shape)}")
        x = images.to(torch.float32).expand(-1, 3, -1, -1)  # grey -> RGB, as the PNGs pytorch-fid reads
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # [0, 1] -> [-1, 1], the range the TF graph was trained on
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # 35x35 (5b-d) -> 17x17 x 768 (6a-e) -> 8x8 x 2048 (7a-c)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)  # (B, 2048)


def inception_state_dict_template() -> dict[str, torch.Size]:
    """Key -> shape of every tensor a pytorch-fid weights file must hold (BatchNorm counters are optional)."""
    with torch.device("meta"):
        model = InceptionFeatures()
    return {key: value.shape for key, value in model.state_dict().items() if not key.endswith(_OPTIONAL_SUFFIX)}


def load_inception_features(path: str | Path) -> InceptionFeatures:
    """pytorch-fid's InceptionV3 with the weights of a local `pt_inception-2015-12-05-6726825d.pth`, frozen.

    Raises:
        FileNotFoundError: no such file; nothing is downloaded, the message says how to pass one.
        ValueError: the file is not a torch checkpoint, or its keys or shapes are not pytorch-fid's.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Inception weights at {path}: FID needs pytorch-fid's file {INCEPTION_FILE} "
                                "(nothing is downloaded); copy it to $TORCH_HOME/hub/checkpoints/ or pass "
                                "--inception-weights PATH")
    fix = f"FID needs pytorch-fid's {INCEPTION_FILE}, not torchvision's ImageNet Inception or another file"
    state = _load_file(path, what="an Inception state dict", fix=fix)
    template = inception_state_dict_template()
    _check_inception_keys(state, template, path, fix)
    state = dict(state)
    for key in template:  # old checkpoints lack the BatchNorm counters
        if key.endswith(".running_mean"):
            state.setdefault(key.removesuffix(".running_mean") + _OPTIONAL_SUFFIX, torch.tensor(0))
    model = InceptionFeatures()
    model.load_state_dict(state, strict=True)
    model.sha256, model.path = _sha256(path), str(path)
    if not model.sha256.startswith(INCEPTION_FILE.split("-")[-1].removesuffix(".pth")):
        log.warning("%s has sha256 %s..., not pytorch-fid's 6726825d...: its FID is not comparable to "
                    "published numbers", path, model.sha256[:8])
    return _freeze(model)


def _check_inception_keys(state: dict[str, Any], template: dict[str, torch.Size], path: Path, fix: str) -> None:
    """ValueError naming the missing, unexpected and mis-shaped keys of `state` against the template."""
    keys = {key for key in state if not key.endswith(_OPTIONAL_SUFFIX)}
    missing = sorted(set(template) - keys)
    unexpected = sorted(keys - set(template))
    shapes = [f"{key} {_shape_of(state[key])} (expected {tuple(template[key])})"
              for key in sorted(keys & set(template)) if _shape_of(state[key]) != tuple(template[key])]
    problems = [f"{len(items)} {label}: {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
                for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("keys with wrong shapes", shapes)) if items]
    if problems:
        raise ValueError(f"{path} does not hold the FID Inception weights ({'; '.join(problems)}); {fix}")


def _shape_of(value: Any) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


# ---------------------------------------------------------------- files

def _load_file(path: Path, *, what: str, fix: str) -> dict[str, Any]:
    """torch.load(weights_only=True) of a dict on the CPU; ValueError naming `fix` for anything else."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as err:
        raise ValueError(f"{path} is not {what} (torch.load failed: {str(err).splitlines()[0][:200]}); {fix}") \
            from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} is not {what} (it holds a {type(loaded).__name__}, not a dict); {fix}")
    return loaded


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file beside `path`, then os.replace: readers never see a partial file.

    Serialised through a buffer: torch.save names the zip archive after the file, and the bytes (so the
    sha256 in the classifier's name) must depend on the contents only.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _freeze(model: _Extractor) -> _Extractor:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
