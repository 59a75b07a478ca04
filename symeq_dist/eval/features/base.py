"""What every feature network for Fréchet distances shares: the `FeatureExtractor` interface and its files.

Weights files are read with `torch.load(weights_only=True)` only; writes are atomic. Must not import models,
runtime or train.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from symeq_dist.errors import InputError

_Extractor = TypeVar("_Extractor", bound="FeatureExtractor")
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
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


def quantise_8bit(images: Tensor) -> Tensor:
    """Images clamped to [0, 1] and rounded to multiples of 1/255, float32: what an 8-bit PNG of them holds.

    Exact no-op on data (uint8 / 255 or binary); model means outside [0, 1] or between levels are moved to
    the nearest level (ties to even).
    """
    return torch.round(images.to(torch.float32).clamp(0, 1) * 255) / 255


def load_file(path: Path, *, what: str, fix: str) -> dict[str, Any]:
    """torch.load(weights_only=True) of a dict on the CPU; ValueError naming `fix` for anything else."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as err:
        raise InputError(f"{path} is not {what} (torch.load failed: {str(err).splitlines()[0][:200]}); {fix}") \
            from None
    if not isinstance(loaded, dict):
        raise InputError(f"{path} is not {what} (it holds a {type(loaded).__name__}, not a dict); {fix}")
    return loaded


def save_atomic(obj: dict[str, Any], path: Path) -> None:
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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def freeze(model: _Extractor) -> _Extractor:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
