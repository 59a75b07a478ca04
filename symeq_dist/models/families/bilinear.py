"""Family `bilinear`: the enumerable bilinear pair of the exact check (docs/consistency.md).

Decoder p(x|z) = prod_i Bern(sigma(W z + b)_i), encoder q(z|x) = prod_j Bern(sigma(V x + c)_j), x the
flattened image bits (dx), z a single Bernoulli latent (dz bits, prior uniform bits). Each conditional is an
exponential family in the identity statistics nu(x) = x, psi(z) = z with natural parameter linear in the
other variable: exp<x, W z + b> / Z(z) and exp<z, V x + c> / Z(x). `symeq_dist.eval.exact` reads W, b, V, c
from the `linear` submodules. Pure torch: must not import `runtime`, deepspeed or any I/O.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from symeq_dist.config.models import BilinearConfig
from symeq_dist.models.distributions import Bernoulli, Distribution
from symeq_dist.models.layers import draw
from symeq_dist.models.players import Decoder, Encoder, Latents, Players, Sample


def _init(linear: nn.Linear, scale: float) -> nn.Linear:
    """Interaction weights ~ N(0, scale^2), bias 0 (drawn from torch's global RNG: seed it for equal ranks)."""
    with torch.no_grad():
        linear.weight.normal_(0.0, scale)  # scale 0: the collapsed point W = 0
        linear.bias.zero_()
    return linear


class BilinearDecoder(Decoder):
    """Single latent "z": logits of x = W z + b, W (dx, dz) = `linear.weight`, b (dx,) = `linear.bias`."""

    def __init__(self, cfg: BilinearConfig) -> None:
        super().__init__()
        self.latent_names = ("z",)
        self.latent_shapes = {"z": (cfg.num_latents,)}
        self.top_family = "bernoulli"
        self.image_shape = cfg.image_shape
        self.linear = _init(nn.Linear(cfg.num_latents, math.prod(cfg.image_shape)), cfg.init_scale)

    def _x_dist(self, z: Latents) -> Distribution:
        logits = self.linear(z["z"])  # (B, dz) -> (B, dx)
        return Bernoulli(logits.reshape(logits.shape[0], *self.image_shape))  # (B, C, H, W)


class BilinearEncoder(Encoder):
    """Single latent "z": logits of z = V x + c, V (dz, dx) = `linear.weight`, c (dz,) = `linear.bias`."""

    def __init__(self, cfg: BilinearConfig) -> None:
        super().__init__()
        self.analytic_kl = True
        self.linear = _init(nn.Linear(math.prod(cfg.image_shape), cfg.num_latents), cfg.init_scale)

    def _posterior(self, x: Tensor) -> Bernoulli:
        return Bernoulli(self.linear(x.flatten(1)))  # (B, C, H, W) -> (B, dz)

    def _sample(self, x: Tensor, decoder: Decoder, generator: torch.Generator | None = None,
                reparam: bool = False) -> Sample:
        q_z = self._posterior(x)
        return {"z": draw(q_z, generator, reparam)}, {"z": q_z}

    def _conditionals(self, x: Tensor, z: Latents, decoder: Decoder) -> dict[str, Distribution]:
        return {"z": self._posterior(x)}


def build_players(cfg: BilinearConfig) -> Players:
    return Players(encoder=BilinearEncoder(cfg), decoder=BilinearDecoder(cfg))
