"""Closed-form priors: pi(z) in a form that can also give its density (the ELBO baseline needs it).

Pure torch: must not import `runtime`.
"""

from __future__ import annotations

import torch

from symeq_dist.models.distributions import Bernoulli, Distribution, Gaussian, OneHotCategorical


class UniformBits:
    """pi(z) = prod Bern(1/2): the prior of every reference model."""

    family = "bernoulli"
    has_density = True  # distribution() exists: the ELBO game and bits/dim can use it

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.randint(0, 2, (n, *self.shape), generator=generator, device=device).float()

    next_codes = sample  # stateless: the game's draws are plain samples

    def distribution(self, n: int, device: torch.device) -> Distribution:
        return Bernoulli(torch.zeros(n, *self.shape, device=device))


class StandardGaussian:
    """pi(z) = N(0, I)."""

    family = "gaussian"
    has_density = True

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.randn((n, *self.shape), generator=generator, device=device)

    next_codes = sample

    def distribution(self, n: int, device: torch.device) -> Distribution:
        zeros = torch.zeros(n, *self.shape, device=device)
        return Gaussian(zeros, zeros)


class UniformClasses:
    """pi(c) = uniform over K classes, as one-hot rows (a class latent, METHOD §7.4)."""

    family = "categorical"
    has_density = True

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        classes = torch.randint(0, self.shape[0], (n,), generator=generator, device=device)
        return torch.nn.functional.one_hot(classes, self.shape[0]).float()

    next_codes = sample

    def distribution(self, n: int, device: torch.device) -> Distribution:
        return OneHotCategorical(torch.zeros(n, *self.shape, device=device))
