"""uint8 images from the stream -> the float x the players see, and the training noise (METHOD §11).

Pure torch: must not import models or engines.
"""

from __future__ import annotations

import torch

from symeq_dist.config import DataConfig


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
