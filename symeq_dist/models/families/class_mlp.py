"""Family `class_mlp`: an MLP VAE with a class latent c above a style latent z (METHOD §7.4, semi-supervised).

Decoder (theta): pi(c) uniform over K classes (one-hot rows, the top latent), p(z | c) = N(mu(c), sigma(c))
(one learned mean and log sigma per class), p(x | c, z) = MLP([c, z]) with two tanh hidden layers. Encoder (phi):
a trunk h = MLP(x) (two tanh hidden layers), q(c | x) = softmax(W h), q(z | x, c) = Gaussian(MLP head of [h, c]);
the encoder factorises like the decoder (c first), so a label can be clamped: `Encoder.sample(..., observed=
{"c": onehot, "c_mask": m})` keeps c = onehot on the rows with m = 1 and draws c ~ q(c | x) on the others (the
draws are made for every row, so a row with m = 0 is exactly an unlabelled row), then z ~ q(z | x, c).
With `model.label: attributes`, c is a vector of 0/1 attribute bits instead (Bernoulli q(c | x), uniform-bits pi(c),
CelebA's 40 attributes as observed bits, METHOD §7.4), the rest unchanged.

Labels as observed latents (`game/symmetric.py`): the decoder also trains on labelled rows with c clamped and z
imputed by the encoder, the encoder adds -log q(c | x) of those rows. The ELBO baseline is refused for this
family (a categorical latent has no reparametrised sample; the semi-supervised ELBO of Kingma et al. 2014 sums
over the classes instead, which is not built). Pure torch: must not import `runtime`, deepspeed or any I/O.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from symeq_dist.config import ClassMLPConfig
from symeq_dist.models.distributions import Bernoulli, Distribution, Gaussian, OneHotCategorical
from symeq_dist.models.layers import XHead, draw, mlp, unpack, x_offset_shape
from symeq_dist.models.players import Decoder, Encoder, Latents, Players, Sample


class ClassMLPDecoder(Decoder):
    """Latents ("c", "z"): p(z | c) per class, p(x | c, z) = MLP([c, z])."""

    def __init__(self, cfg: ClassMLPConfig) -> None:
        super().__init__()
        self.latent_names = ("c", "z")
        self.latent_shapes = {"c": (cfg.num_classes,), "z": (cfg.num_latents,)}
        self.top_family = "categorical" if cfg.label == "class" else "bernoulli"
        self.z_given_c = nn.Linear(cfg.num_classes, 2 * cfg.num_latents)
        nn.init.zeros_(self.z_given_c.weight)  # starts at N(0, I) for every class
        nn.init.zeros_(self.z_given_c.bias)
        sizes = [cfg.num_classes + cfg.num_latents, cfg.hidden, cfg.hidden, math.prod(cfg.image_shape)]
        self.net = nn.Sequential(mlp(sizes, nn.Tanh, final_activation=False), nn.Unflatten(1, cfg.image_shape))
        sigma_shape = cfg.image_shape if cfg.sigma == "per_dim" else ()
        self.x_head = XHead(cfg.x_dist, sigma_shape, offset_shape=x_offset_shape(cfg))

    def _latent_conditional(self, name: str, z: Latents) -> Distribution:
        mu, log_sigma = self.z_given_c(z["c"]).chunk(2, dim=1)
        return Gaussian(mu, log_sigma)

    def _x_dist(self, z: Latents) -> Distribution:
        return unpack(self.x_head(self.net(torch.cat([z["c"], z["z"]], dim=1))))


class ClassMLPEncoder(Encoder):
    """q(c | x) from the trunk, then q(z | x, c) from the trunk and c."""

    def __init__(self, cfg: ClassMLPConfig) -> None:
        super().__init__()
        self.analytic_kl = False
        sizes = [math.prod(cfg.image_shape), cfg.hidden, cfg.hidden]
        self.trunk = nn.Sequential(nn.Flatten(1), mlp(sizes, nn.Tanh, final_activation=True))
        self.class_head = nn.Linear(cfg.hidden, cfg.num_classes)
        self._q_c = OneHotCategorical if cfg.label == "class" else Bernoulli
        self.z_head = nn.Linear(cfg.hidden + cfg.num_classes, 2 * cfg.num_latents)

    def _q_z(self, h: Tensor, c: Tensor) -> Distribution:
        mu, log_sigma = self.z_head(torch.cat([h, c.to(h.dtype)], dim=1)).chunk(2, dim=1)
        return Gaussian(mu, log_sigma)

    def _sample(self, x: Tensor, decoder: Decoder, generator: torch.Generator | None = None,
                reparam: bool = False, observed: Latents | None = None) -> Sample:
        h = self.trunk(x)
        q_c = self._q_c(self.class_head(h))
        c = draw(q_c, generator, reparam)
        if observed is not None and "c" in observed:  # labelled rows keep their label
            mask = observed["c_mask"].to(c.dtype).unsqueeze(1)
            c = mask * observed["c"].to(c.dtype) + (1 - mask) * c
        q_z = self._q_z(h, c)
        return {"c": c, "z": draw(q_z, generator, reparam)}, {"c": q_c, "z": q_z}

    def _conditionals(self, x: Tensor, z: Latents, decoder: Decoder) -> dict[str, Distribution]:
        h = self.trunk(x)
        return {"c": self._q_c(self.class_head(h)), "z": self._q_z(h, z["c"])}


def build_players(cfg: ClassMLPConfig) -> Players:
    return Players(encoder=ClassMLPEncoder(cfg), decoder=ClassMLPDecoder(cfg))
