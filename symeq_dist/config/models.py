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
    x_offset: Literal["none", "data_marginal"] = "none"
    """Bernoulli x only: data_marginal adds a fixed per-pixel offset, the logit of the training split's
    binarised pixel marginal (measured from the shards when a run starts, stored in checkpoints), to the
    decoder's pixel logits, so that a decoder that ignores z already matches the data's marginal. A
    parametrisation of p(x|z), not a change of the game (docs/consistency.md, the ladder's plateau)."""

    def __post_init__(self) -> None:
        check(all(s > 0 for s in self.image_shape), "model.image_shape", "must be three positive ints")
        check(self.x_offset == "none" or self.x_dist == "bernoulli", "model.x_offset",
              f"data_marginal is the logit of a binary pixel's marginal, for x_dist=bernoulli (got "
              f"{self.x_dist}); set model.x_offset=none")


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
    init_gain: float = 1.0
    """Multiplies every weight matrix and kernel of both players after torch's default initialisation
    (biases untouched); 1 = the reference code's init (docs/consistency.md, the ladder's plateau)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_z0", "num_z1", "trunk_width", "mlp_width"):
            check(getattr(self, name) > 0, f"model.{name}", "must be a positive integer")
        check(self.init_gain > 0, "model.init_gain", "must be > 0 (1 = torch's default initialisation)")
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


@dataclass(frozen=True, kw_only=True)
class BilinearConfig(ImageModelConfig):
    """The enumerable bilinear pair of the exact check (docs/consistency.md): Bernoulli x in {0,1}^dx and z in
    {0,1}^dz, p(x|z) = prod_i Bern(sigma(W z + b)_i), q(z|x) = prod_j Bern(sigma(V x + c)_j).

    An exponential family "lifted" by the identity statistics nu(x) = x, psi(z) = z: each conditional is
    exp<nu(x), W psi(z) + b> / normaliser (and its mirror for q). dx = prod(image_shape); the exact
    computations (`symeq_dist.eval.exact`) enumerate all 2^(dx+dz) pairs, so keep dx + dz small there.
    """

    kind: Literal["bilinear"] = "bilinear"
    image_shape: tuple[int, int, int] = (1, 1, 6)
    """(channels, height, width) of x; (1, 1, dx) by convention, any shape is flattened to dx bits."""
    num_latents: int = 3
    """dz, the number of latent bits (prior: uniform bits)."""
    init_scale: float = 1.0
    """Standard deviation of the initial interaction weights W and V; the biases b and c start at 0."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.num_latents > 0, "model.num_latents", "must be a positive integer")
        check(self.init_scale >= 0, "model.init_scale", "must be >= 0 (0 starts at the collapsed point W = V = 0)")
        check(self.x_dist == "bernoulli", "model.x_dist", "the bilinear pair has Bernoulli x; use kind=mlp for "
              "Gaussian x")
        check(self.x_offset == "none", "model.x_offset", "the bilinear pair has no image net to offset; set "
              "model.x_offset=none")


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """One resolution of the hierarchical VAE (decoder top-down, encoder bottom-up)."""

    resolution: int
    """Side of the square feature maps and latents at this stage (e.g. 1, 4, 8, 16, 32, 64)."""
    width: int
    """Channels of the decoder state and the encoder features here."""
    groups: int = 1
    """Latent groups at this resolution, each `latent_channels` x resolution x resolution."""
    encoder_cells: int = 1
    """Residual cells of the bottom-up encoder at this resolution."""
    decoder_cells: int = 1
    """Residual cells of the decoder after each latent group here (depth without more latents)."""

    def __post_init__(self) -> None:
        for name in ("resolution", "width", "encoder_cells", "decoder_cells"):
            check(getattr(self, name) >= 1, f"model.stages[].{name}", "must be >= 1")
        check(self.groups >= 0, "model.stages[].groups", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class HVAEConfig(ImageModelConfig):
    """Deep multi-scale hierarchical VAE (VDVAE-style top-down decoder, ladder encoder; docs/hvae.md)."""

    kind: Literal["hvae"] = "hvae"
    image_shape: tuple[int, int, int] = (1, 32, 32)
    x_dist: Literal["bernoulli", "gaussian", "logistic_mixture"] = "bernoulli"
    """p(x|z): Bernoulli (binary images), Gaussian with learned scale, or the discretised logistic mixture of
    8-bit colour images (the likelihood behind the bits/dim of VDVAE and NVAE)."""
    num_mixtures: int = 10
    """Components of the logistic mixture."""
    latent: Literal["gaussian", "bernoulli"] = "gaussian"
    """Family of every latent group; the top group's prior is N(0, I) or uniform bits (prior.kind)."""
    latent_channels: int = 8
    """Channels of every latent group."""
    soft_clamp: float | None = 5.0
    """Gaussian latents: the mean and the log sigma of every head (prior and posterior) are soft-clamped to
    c * tanh(raw / c), NVAE's soft_clamp5 (c = 5: |mu| < 5, sigma in [0.0067, 148]); null leaves them free.
    Without it the alternating game can grow a group's codes without bound until gradients explode
    (docs/hvae.md)."""
    sigma_max: float | None = 1.0
    """Gaussian latents: every head's sigma is kept below this by a smooth minimum (log sigma = m - softplus(m -
    raw), m = log sigma_max; sigma 0.5 sigma_max at raw 0); null: no upper bound beyond soft_clamp. The scale of an
    intermediate group is not identified (the next projection can undo any scale), and the alternating game
    drifts along that freedom: measured, a group's sigma grew to the soft clamp's 148 and the encoder's gradient
    exploded (docs/hvae.md). The bound anchors the scale."""
    stages: tuple[StageConfig, ...] = (StageConfig(resolution=1, width=64, groups=1),
                                       StageConfig(resolution=4, width=64, groups=2),
                                       StageConfig(resolution=8, width=64, groups=2),
                                       StageConfig(resolution=16, width=32, groups=1),
                                       StageConfig(resolution=32, width=32, groups=0))
    """Resolutions from low to high, the last the image's; the first group of the first stage with groups is
    the top latent z0 ~ pi."""
    bottleneck: float = 0.25
    """Middle width of a residual cell relative to its width."""
    checkpoint_cells: bool = False
    """Recompute every residual cell in the backward instead of storing its activations (activation
    checkpointing: less memory, about one more forward of compute)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        res = [s.resolution for s in self.stages]
        check(len(res) >= 1 and res == sorted(set(res)), "model.stages", f"resolutions must increase, got {res}")
        check(self.image_shape[1] == self.image_shape[2] == res[-1], "model.stages",
              f"the last resolution ({res[-1]}) must be the image's side {self.image_shape[1:]} (square images)")
        check(self.stages[0].groups >= 1, "model.stages",
              "the first (lowest) stage holds the top latent: give it groups >= 1")
        check(self.latent_channels >= 1 and self.num_mixtures >= 1, "model.latent_channels",
              "latent_channels and num_mixtures must be >= 1")
        check(0 < self.bottleneck <= 1, "model.bottleneck", "must be in (0, 1]")
        check(self.sigma_max is None or self.sigma_max > 0, "model.sigma_max", "must be > 0 or null")
        check(self.soft_clamp is None or self.soft_clamp > 0, "model.soft_clamp",
              "must be > 0 or null (unbounded)")
        check(self.x_dist != "logistic_mixture" or self.image_shape[0] in (1, 3), "model.x_dist",
              "the logistic mixture models grey (1) or RGB (3) images")


@dataclass(frozen=True, kw_only=True)
class SegHVAEConfig(HVAEConfig):
    """Image + segmentation model (METHOD §7.6, the paper's Fig. 3/4; docs/structured.md): the hierarchical VAE of
    `hvae` whose top latent is a per-pixel label map s ~ pi(s) (masks, `prior.kind=masks`) that conditions every
    latent group and p(x | s, z); the encoder adds a segmentation head q(s | x). Labelled images enter as observed
    values of s (`data.labelled_fraction`)."""

    kind: Literal["seg_hvae"] = "seg_hvae"  # type: ignore[assignment]
    num_classes: int = 11
    """K, the label-map classes (background included); must match the shards' `mask` entry."""
    seg_width: int = 32
    """Channels of the segmentation head q(s | x): every encoder resolution is projected to this width, upsampled
    and summed (a feature pyramid), then two 3x3 convs give the per-pixel logits."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.num_classes >= 2, "model.num_classes", "a label map needs >= 2 classes")
        check(self.seg_width >= 1, "model.seg_width", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class ClassMLPConfig(ImageModelConfig):
    """MLP VAE whose top latent is a class c (one-hot, uniform prior) or a vector of attribute bits above a Gaussian
    style latent z: labels enter as observed values of c for the labelled rows (METHOD §7.4; `data.labels_per_class`,
    or `data.labelled_fraction` for attributes)."""

    kind: Literal["class_mlp"] = "class_mlp"
    label: Literal["class", "attributes"] = "class"
    """class: c is one of K classes (one-hot, uniform prior; `data.labels_per_class`); attributes: c is K 0/1 attribute
    bits (e.g. CelebA's 40; Bernoulli q(c | x), uniform-bits prior; `data.labelled_fraction` of the training images
    keep their attribute vector)."""
    num_classes: int = 10
    """K, the classes (or attributes) of c; must match the shards' labels."""
    num_latents: int = 16
    """Dimension of the style latent z (Gaussian, p(z | c) learned per class)."""
    hidden: int = 512
    """Width of the two hidden layers of each player."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_classes", "num_latents", "hidden"):
            check(getattr(self, name) > 0, f"model.{name}", "must be a positive integer")


ModelConfig = (MLPVAEConfig | Ladder28Config | Reverse28Config | BilinearConfig | HVAEConfig | ClassMLPConfig
               | SegHVAEConfig)
MODEL_CONFIGS: dict[str, type[ModelConfig]] = {
    cls.kind: cls for cls in (MLPVAEConfig, Ladder28Config, Reverse28Config, BilinearConfig,  # type: ignore[misc]
                              HVAEConfig, ClassMLPConfig, SegHVAEConfig)
}


def model_config(kind: str = "mlp", **fields: object) -> ModelConfig:
    """The model config of family `kind` with `fields` (for code and tests; YAML goes through load_config).

    Raises:
        ConfigError: unknown kind (lists the known ones), or an invalid field value.
    """
    check(kind in MODEL_CONFIGS, "model.kind", f"invalid value {kind!r}; choose one of {', '.join(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[kind](**fields)  # type: ignore[arg-type]
