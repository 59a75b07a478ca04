"""The config of a separately trained prior model (`symeq prior train`, trained with accelerate; METHOD §7.5).

Same style as a game run: YAML + dotted overrides, one frozen tree; the run directory holds config.yaml, tb/
and checkpoints/ as a game run does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from symeq_dist.config.base import check


@dataclass(frozen=True, kw_only=True)
class PriorModelConfig:
    kind: Literal["diffusion", "made"] = "diffusion"
    """diffusion: a DDPM over real-valued codes (vectors or feature maps); made: an autoregressive model over
    0/1 codes. Which family fits is read from the latent shards' manifest and checked."""
    hidden: int = 256
    """Width of the denoiser (diffusion) or of the masked layers (made)."""
    depth: int = 3
    """Residual blocks (diffusion) or hidden masked layers (made)."""
    timesteps: int = 1000
    """diffusion: noise levels of training."""
    sample_steps: int = 100
    """diffusion: DDIM steps of sampling (<= timesteps)."""
    normalize: bool = True
    """diffusion: standardise codes with the training split's per-element mean and std (stored with the weights)."""

    def __post_init__(self) -> None:
        check(self.hidden >= 1 and self.depth >= 1, "model.hidden/depth", "must be >= 1")
        check(1 <= self.sample_steps <= self.timesteps, "model.sample_steps", "must be in 1..model.timesteps")


@dataclass(frozen=True, kw_only=True)
class PriorDataConfig:
    shards: str = "data_shards/codes"
    """A latent shard set (`symeq prior codes RUN --out DIR`)."""
    split: str = "train"
    eval_split: str = "valid"
    """Held-out codes: the loss logged as eval/loss, and `symeq prior eval`'s reference."""
    shuffle_buffer: int = 1000
    num_workers: int = 0
    """DataLoader workers per process (0 reads in the training process: codes are small)."""
    bad_samples: Literal["fail", "skip"] = "fail"


@dataclass(frozen=True, kw_only=True)
class PriorTrainConfig:
    steps: int = 2000
    batch_size: int = 256
    """GLOBAL batch, split over the processes."""
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Clip the gradient norm (accelerate's clip_grad_norm_); 0 = off."""
    ema_decay: float = 0.999
    """Average the weights for sampling (0 = off); `prior.kind=model` and `symeq prior sample` use the averages."""

    def __post_init__(self) -> None:
        check(self.steps >= 0, "train.steps", "must be >= 0")
        check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        check(self.lr > 0, "train.lr", "must be > 0")
        check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = off)")
        check(0.0 <= self.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1) (0 = off)")


@dataclass(frozen=True, kw_only=True)
class PriorMonitorConfig:
    log_every: int = 50
    eval_every: int = 500
    """Held-out loss every this many steps (and at the end)."""
    eval_batches: int = 4
    progress: bool = True


@dataclass(frozen=True, kw_only=True)
class PriorCheckpointConfig:
    every: int = 500
    keep_last: int = 2

    def __post_init__(self) -> None:
        check(self.every >= 1 and self.keep_last >= 1, "checkpoint.every/keep_last", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class PriorRunConfig:
    run_dir: str = "runs/prior"
    seed: int = 0
    resume: bool = False
    model: PriorModelConfig = field(default_factory=PriorModelConfig)
    data: PriorDataConfig = field(default_factory=PriorDataConfig)
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)
    monitor: PriorMonitorConfig = field(default_factory=PriorMonitorConfig)
    checkpoint: PriorCheckpointConfig = field(default_factory=PriorCheckpointConfig)

    def micro_batch_size(self, world_size: int) -> int:
        check(self.train.batch_size % world_size == 0, "train.batch_size",
              f"{self.train.batch_size} is not divisible by {world_size} processes; choose a multiple")
        return self.train.batch_size // world_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
