"""The latent source pi(z) of the top latent: only `sample(n)` is needed by the game.

Closed-form priors (uniform bits, standard Gaussian) also give `distribution(n)` for the ELBO baseline;
implicit priors (issue: samples of a separately trained model) will implement `sample` only.
"""

from __future__ import annotations

from typing import Protocol

import torch

from symeq_dist.models.distributions import Bernoulli, Distribution, Gaussian


class Prior(Protocol):
    shape: tuple[int, ...]

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor: ...

    def distribution(self, n: int, device: torch.device) -> Distribution: ...


class UniformBits:
    """pi(z) = prod Bern(1/2): the prior of every reference model."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.randint(0, 2, (n, *self.shape), generator=generator, device=device).float()

    def distribution(self, n: int, device: torch.device) -> Distribution:
        return Bernoulli(torch.zeros(n, *self.shape, device=device))


class StandardGaussian:
    """pi(z) = N(0, I)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.randn((n, *self.shape), generator=generator, device=device)

    def distribution(self, n: int, device: torch.device) -> Distribution:
        zeros = torch.zeros(n, *self.shape, device=device)
        return Gaussian(zeros, zeros)


def build_prior(family: str, shape: tuple[int, ...]) -> Prior:
    """The closed-form prior matching the decoder's top latent family."""
    if family == "bernoulli":
        return UniformBits(shape)
    if family == "gaussian":
        return StandardGaussian(shape)
    raise ValueError(f"no prior for latent family {family!r}; expected 'bernoulli' or 'gaussian'")
