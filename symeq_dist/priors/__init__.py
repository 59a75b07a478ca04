"""The latent source pi(z) of the decoder's top latent: the game only ever calls `sample(n)` (METHOD §1, §7.5).

Closed-form priors (uniform bits, standard Gaussian) also give `distribution(n)` for the ELBO baseline.
`build_prior` picks the kind from `prior.kind` (registry `PRIORS`) and checks it against the decoder's top
latent. Implicit priors (a separately trained model, latent shards) arrive with the prior kinds `model`
and `shards` (docs/extending.md: adding a prior kind). Must not import `runtime.engines`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from symeq_dist.config import ConfigError, PriorConfig
from symeq_dist.models.distributions import Distribution
from symeq_dist.models.players import Decoder
from symeq_dist.priors.closed_form import StandardGaussian, UniformBits


class Prior(Protocol):
    shape: tuple[int, ...]
    family: str

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor: ...

    def distribution(self, n: int, device: torch.device) -> Distribution: ...


PRIORS: dict[str, type] = {"standard_gaussian": StandardGaussian, "uniform_bits": UniformBits}
_AUTO = {"gaussian": "standard_gaussian", "bernoulli": "uniform_bits"}


def build_prior(cfg: PriorConfig, decoder: Decoder) -> Prior:
    """pi(z) for the decoder's top latent.

    Raises:
        ConfigError: the prior's sample space does not match the top latent (names both).
    """
    top = decoder.latent_names[0]
    shape, family = decoder.latent_shapes[top], decoder.top_family
    kind = _AUTO.get(family) if cfg.kind == "auto" else cfg.kind
    if kind is None:
        raise ConfigError(f"prior.kind: no closed-form prior for a {family} top latent; choose one of {list(PRIORS)}")
    prior = PRIORS[kind](shape)
    if prior.family != family:
        raise ConfigError(f"prior.kind: {kind} draws {prior.family} samples, but the decoder's top latent {top!r} "
                          f"is {family} with shape {shape}; use prior.kind={_AUTO[family]} (or auto)")
    return prior


__all__ = ["PRIORS", "Prior", "StandardGaussian", "UniformBits", "build_prior"]
