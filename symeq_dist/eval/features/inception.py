"""pytorch-fid's FID InceptionV3, re-implemented in plain torch and loaded only from a local weights file:
nothing is ever downloaded (METHOD.md §13.2). Must not import models, runtime or train.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symeq_dist.errors import InputError, MissingInput
from symeq_dist.eval.features.base import FeatureExtractor, freeze, load_file, quantise_8bit, sha256

log = logging.getLogger(__name__)

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SIZE = 299  # pytorch-fid resizes every input to 299 x 299 (bilinear, align_corners=False)
INCEPTION_DIM = 2048  # pool3: Mixed_7c averaged over its 8 x 8 map
INCEPTION_CLASSES = 1008  # the TF 2015-12-05 graph has 1008 logits (1000 ImageNet classes + 8 unused)
_OPTIONAL_SUFFIX = ".num_batches_tracked"  # BatchNorm counters: absent from old checkpoints, unused in eval


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
    pytorch-fid reads 8-bit PNGs, so `forward` first clamps the images to [0, 1] and rounds them to multiples
    of 1/255 (`quantise_8bit`) for parity with its file-based numbers: Gaussian-x means outside [0, 1] or
    between levels are embedded as their PNG would be; data (x / 255 or binary) pass unchanged.
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
        x = quantise_8bit(images).expand(-1, 3, -1, -1)  # (B, 3, H, W): 8-bit levels, grey -> RGB, as its PNGs
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
        raise MissingInput(f"no Inception weights at {path}: FID needs pytorch-fid's file {INCEPTION_FILE} "
                                "(nothing is downloaded); copy it to $TORCH_HOME/hub/checkpoints/ or pass "
                                "--inception-weights PATH")
    fix = f"FID needs pytorch-fid's {INCEPTION_FILE}, not torchvision's ImageNet Inception or another file"
    state = load_file(path, what="an Inception state dict", fix=fix)
    template = inception_state_dict_template()
    _check_inception_keys(state, template, path, fix)
    state = dict(state)
    for key in template:  # old checkpoints lack the BatchNorm counters
        if key.endswith(".running_mean"):
            state.setdefault(key.removesuffix(".running_mean") + _OPTIONAL_SUFFIX, torch.tensor(0))
    model = InceptionFeatures()
    model.load_state_dict(state, strict=True)
    model.sha256, model.path = sha256(path), str(path)
    if not model.sha256.startswith(INCEPTION_FILE.split("-")[-1].removesuffix(".pth")):
        log.warning("%s has sha256 %s..., not pytorch-fid's 6726825d...: its FID is not comparable to "
                    "published numbers", path, model.sha256[:8])
    return freeze(model)


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
        raise InputError(f"{path} does not hold the FID Inception weights ({'; '.join(problems)}); {fix}")


def _shape_of(value: Any) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
