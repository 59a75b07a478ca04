"""Model configs, one class per `model.kind` (a tagged union): the kind picks the class, the class its keys.

Adding a family: a `<Name>Config` here with `kind: Literal["<kind>"]`, listed in `MODEL_CONFIGS`; its
networks in `models/families/<name>.py`; one line in `models/registry.py` (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from symeq_dist.config.base import check


@dataclass(frozen=True, kw_only=True)
class ImageModelConfig:
    """Fields every family has: the image and its likelihood p(x|z)."""

    kind: str = ""
    """The family (each subclass fixes it): mlp, ladder, reverse."""
    image_shape: tuple[int, int, int] = (1, 28, 28)
    """(channels, height, width) of x; must match the shards' manifest."""
    x_dist: Literal["bernoulli", "gaussian"] = "bernoulli"
    """p(x|z): Bernoulli logits (binarised data) or Gaussian mean with a learned log sigma."""
    sigma: Literal["global", "per_dim"] = "global"
    """Gaussian x only: one learned log sigma, or one per pixel."""

    def __post_init__(self) -> None:
        check(all(s > 0 for s in self.image_shape), "model.image_shape", "must be three positive ints")


@dataclass(frozen=True, kw_only=True)
class MLPVAEConfig(ImageModelConfig):
    """Single-latent MLP VAE (METHOD §7.1): fast, any image size."""

    kind: Literal["mlp"] = "mlp"
    latent: Literal["gaussian", "bernoulli"] = "gaussian"
    """The latent family; the prior is N(0, I) or uniform bits accordingly."""
    num_latents: int = 16
    """Latent dimension."""
    hidden: int = 512
    """Width of the two hidden layers of each player."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_latents", "hidden"):
            check(getattr(self, name) > 0, f"model.{name}", "must be a positive integer")


@dataclass(frozen=True, kw_only=True)
class Reference28Config(ImageModelConfig):
    """The reference two-layer Bernoulli HVAE of the paper's code, built for 28x28 grey images (METHOD §10)."""

    num_z0: int = 30
    """Bits in the top latent z0 (prior Bern(1/2))."""
    num_z1: int = 100
    """Bits in z1."""
    trunk_width: int = 600
    """Encoder conv-trunk output width M (600 MNIST, 1000 Fashion-MNIST)."""
    mlp_width: int = 600
    """Width of the fully connected nets (g_theta, heads)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_z0", "num_z1", "trunk_width", "mlp_width"):
            check(getattr(self, name) > 0, f"model.{name}", "must be a positive integer")
        check(self.image_shape == (1, 28, 28), "model.image_shape",
              f"the reference {self.kind} HVAE is built for (1, 28, 28) images; use model.kind=mlp")


@dataclass(frozen=True, kw_only=True)
class Ladder28Config(Reference28Config):
    """Ladder encoder order: q(z0|x) q(z1|z0, x), sharing the decoder's g_theta (METHOD §7.2)."""

    kind: Literal["ladder"] = "ladder"


@dataclass(frozen=True, kw_only=True)
class Reverse28Config(Reference28Config):
    """Reverse (wake-sleep) encoder order: q(z1|x) q(z0|z1) (METHOD §7.3); Bernoulli x only."""

    kind: Literal["reverse"] = "reverse"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.x_dist == "bernoulli", "model.x_dist",
              "the reverse HVAE of the reference code has Bernoulli x; use kind=ladder for Gaussian x")


ModelConfig = MLPVAEConfig | Ladder28Config | Reverse28Config
MODEL_CONFIGS: dict[str, type[ModelConfig]] = {
    cls.kind: cls for cls in (MLPVAEConfig, Ladder28Config, Reverse28Config)  # type: ignore[misc]
}


def model_config(kind: str = "mlp", **fields: object) -> ModelConfig:
    """The model config of family `kind` with `fields` (for code and tests; YAML goes through load_config).

    Raises:
        ConfigError: unknown kind (lists the known ones), or an invalid field value.
    """
    check(kind in MODEL_CONFIGS, "model.kind", f"invalid value {kind!r}; choose one of {', '.join(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[kind](**fields)  # type: ignore[arg-type]
