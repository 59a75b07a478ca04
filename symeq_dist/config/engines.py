"""Per-player optimiser settings; the shared DeepSpeed settings live in ds_config.json."""

from __future__ import annotations

from dataclasses import dataclass, field

from symeq_dist.config.base import check


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    lr: float = 1e-4
    """Adam learning rate (plain Adam, not AdamW). 0 freezes the player: its engine still runs every forward
    and backward, and Adam's update lr * m / (sqrt(v) + eps) is exactly 0, so its weights stay bitwise equal to
    their initial values (best-response runs; tested in tests/test_exact.py)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    zero_stage: int | None = None
    """Override of ds_config.json's ZeRO stage for this player (0-3); null keeps the shared value."""

    def __post_init__(self) -> None:
        check(self.lr >= 0, "engines.*.lr", f"must be > 0 (or 0 to freeze the player), got {self.lr}")
        check(all(0 <= b < 1 for b in self.betas), "engines.*.betas", "both must be in [0, 1)")
        check(self.eps > 0, "engines.*.eps", "must be > 0")
        check(self.weight_decay >= 0, "engines.*.weight_decay", "must be >= 0")
        check(self.zero_stage in (None, 0, 1, 2, 3), "engines.*.zero_stage", "must be 0, 1, 2, 3 or null")


@dataclass(frozen=True, kw_only=True)
class EnginesConfig:
    ds_config: str = "ds_config.json"
    """Shared DeepSpeed settings (precision, ZeRO stage, gradient clipping); no lr, no batch sizes."""
    encoder: EngineConfig = field(default_factory=EngineConfig)
    decoder: EngineConfig = field(default_factory=EngineConfig)
