"""Family `mlp`: the single-latent MLP VAE (METHOD §7.1), any image size, Gaussian or Bernoulli latent.

Encoder: prod(image_shape) -> hidden -> hidden (tanh) -> q(z|x) head. Decoder: num_latents -> hidden ->
hidden (tanh) -> p(x|z). Pure torch: must not import `runtime`, deepspeed or any I/O.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from symeq_dist.config import MLPVAEConfig
from symeq_dist.models.distributions import Bernoulli, Distribution, Gaussian
from symeq_dist.models.layers import XHead, draw, mlp, unpack, x_offset_shape
from symeq_dist.models.players import Decoder, Encoder, Latents, Players, Sample


class MLPDecoder(Decoder):
    """Single latent "z": MLP num_latents -> hidden -> hidden (tanh) -> prod(image_shape)."""

    def __init__(self, cfg: MLPVAEConfig) -> None:
        super().__init__()
        self.latent_names = ("z",)
        self.latent_shapes = {"z": (cfg.num_latents,)}
        self.top_family = cfg.latent
        sizes = [cfg.num_latents, cfg.hidden, cfg.hidden, math.prod(cfg.image_shape)]
        self.net = nn.Sequential(mlp(sizes, nn.Tanh, final_activation=False), nn.Unflatten(1, cfg.image_shape))
        sigma_shape = cfg.image_shape if cfg.sigma == "per_dim" else ()
        self.x_head = XHead(cfg.x_dist, sigma_shape, offset_shape=x_offset_shape(cfg))

    def _x_dist(self, z: Latents) -> Distribution:
        return unpack(self.x_head(self.net(z["z"])))  # (B, num_latents) -> (B, C, H, W)


class MLPEncoder(Encoder):
    """Single latent "z": MLP prod(image_shape) -> hidden -> hidden (tanh) -> head.

    Gaussian latent: head gives (mu, log_sigma) per sample (2 * num_latents); Bernoulli: num_latents logits.
    """

    def __init__(self, cfg: MLPVAEConfig) -> None:
        super().__init__()
        self.analytic_kl = True
        self.family = cfg.latent
        num_out = cfg.num_latents * (2 if cfg.latent == "gaussian" else 1)
        sizes = [math.prod(cfg.image_shape), cfg.hidden, cfg.hidden, num_out]
        self.net = nn.Sequential(nn.Flatten(1), mlp(sizes, nn.Tanh, final_activation=False))

    def _posterior(self, x: Tensor) -> Distribution:
        out = self.net(x)  # (B, C, H, W) -> (B, num_out)
        if self.family == "gaussian":
            mu, log_sigma = out.chunk(2, dim=1)  # (B, num_latents) each
            return Gaussian(mu, log_sigma)
        return Bernoulli(out)

    def _sample(self, x: Tensor, decoder: Decoder, generator: torch.Generator | None = None,
                reparam: bool = False) -> Sample:
        q_z = self._posterior(x)
        return {"z": draw(q_z, generator, reparam)}, {"z": q_z}

    def _conditionals(self, x: Tensor, z: Latents, decoder: Decoder) -> dict[str, Distribution]:
        return {"z": self._posterior(x)}


def build_players(cfg: MLPVAEConfig) -> Players:
    return Players(encoder=MLPEncoder(cfg), decoder=MLPDecoder(cfg))
