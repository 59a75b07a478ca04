"""The family registry: `model.kind` -> the family's `build_players(cfg) -> Players` (docs/extending.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from symeq_dist.config import ModelConfig
from symeq_dist.models.families import bilinear, class_mlp, hvae, ladder28, mlp_vae, reverse28, seg_hvae
from symeq_dist.models.players import Players

FAMILIES: dict[str, Callable[[Any], Players]] = {
    "mlp": mlp_vae.build_players,
    "ladder": ladder28.build_players,
    "reverse": reverse28.build_players,
    "bilinear": bilinear.build_players,
    "hvae": hvae.build_players,
    "class_mlp": class_mlp.build_players,
    "seg_hvae": seg_hvae.build_players,
}


def build_players(cfg: ModelConfig) -> Players:
    """Both players of the family `cfg.kind`, freshly initialised (seed torch first for equal ranks)."""
    return FAMILIES[cfg.kind](cfg)
