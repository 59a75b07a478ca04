"""The latent source pi(z) of the decoder's top latent: the game only ever draws from it (METHOD §1, §7.5).

Closed-form priors (uniform bits, standard Gaussian) also give `distribution(n)` for the ELBO baseline.
Implicit priors (`implicit.py`: a separately trained prior model, `prior.kind=model`; latent shards,
`prior.kind=shards`; label maps, `prior.kind=masks`) only sample. `build_prior` picks the kind from `prior.kind`
and checks the prior's sample space against the decoder's top latent. The prior models and their trainer
(accelerate) are `models.py` and `trainer.py`; `codes.py` writes latent shard sets. Must not import `runtime.engines`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from symeq_dist.config import ConfigError, PriorConfig
from symeq_dist.models.distributions import Distribution
from symeq_dist.models.players import Decoder
from symeq_dist.priors.closed_form import StandardGaussian, UniformBits, UniformClasses
from symeq_dist.priors.implicit import MaskPrior, ModelPrior, ShardPrior, StreamSpec


class Prior(Protocol):
    shape: tuple[int, ...]
    family: str
    has_density: bool
    """Whether `distribution` exists (closed forms); implicit priors only sample."""

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """n codes for grids, chains and evaluation; draws only from `generator`."""
        ...

    def next_codes(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """The game's next n dream codes (a streamed or buffered prior advances; state in `state_dict`)."""
        ...

    def distribution(self, n: int, device: torch.device) -> Distribution: ...


PRIORS: dict[str, type] = {"standard_gaussian": StandardGaussian, "uniform_bits": UniformBits,
                           "uniform_classes": UniformClasses}
_AUTO = {"gaussian": "standard_gaussian", "bernoulli": "uniform_bits", "categorical": "uniform_classes"}


def build_prior(cfg: PriorConfig, decoder: Decoder, *, device: torch.device | None = None,
                stream: StreamSpec | None = None) -> Prior:
    """pi(z) for the decoder's top latent (`stream`: where a `shards` prior's game codes come from; without it such
    a prior only samples, as evaluation needs).

    Raises:
        ConfigError: the prior's sample space does not match the top latent (names both).
    """
    top = decoder.latent_names[0]
    shape, family = decoder.latent_shapes[top], decoder.top_family
    if cfg.kind == "model":
        prior: Any = ModelPrior(cfg.run, refresh_every=cfg.refresh_every, sample_steps=cfg.sample_steps,
                                device=device)
    elif cfg.kind == "shards":
        prior = ShardPrior(cfg, stream)
    elif cfg.kind == "masks":
        prior = MaskPrior(cfg)
    else:
        kind = _AUTO.get(family) if cfg.kind == "auto" else cfg.kind
        if kind is None:
            raise ConfigError(f"prior.kind: no closed-form prior for a {family} top latent; choose one of "
                              f"{list(PRIORS)}")
        prior = PRIORS[kind](shape)
        if prior.family != family:
            raise ConfigError(f"prior.kind: {kind} draws {prior.family} samples, but the decoder's top latent "
                              f"{top!r} is {family} with shape {shape}; use prior.kind={_AUTO[family]} (or auto)")
        return prior
    if cfg.kind == "masks" and tuple(prior.shape) != tuple(shape):
        raise ConfigError(f"model.num_classes / model.image_shape: the label maps of {cfg.shards} are "
                          f"{tuple(prior.shape)} (classes, height, width), the model's top latent {top!r} is "
                          f"{tuple(shape)}; set model.num_classes={prior.shape[0]} (and the image side to match)")
    if (tuple(prior.shape), prior.family) != (tuple(shape), family):
        raise ConfigError(f"prior.kind={cfg.kind}: {prior.source} draws {prior.family} codes of shape "
                          f"{tuple(prior.shape)}, but the decoder's top latent {top!r} is {family} with shape "
                          f"{tuple(shape)}; give a prior trained on this model's codes (`symeq prior codes RUN`, "
                          "then `symeq prior train`) or change model.* to match")
    return prior


__all__ = ["PRIORS", "MaskPrior", "ModelPrior", "Prior", "ShardPrior", "StandardGaussian", "StreamSpec", "UniformBits",
           "UniformClasses", "build_prior"]
