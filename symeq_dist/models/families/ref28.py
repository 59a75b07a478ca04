"""The reference networks of the paper's code for 28x28 grey images, shared by the `ladder` and `reverse`
families (METHOD §10): the encoder's conv trunk, the decoder's conv-transpose image net f_theta and the
two-layer decoder z0 ~ Bern(1/2), p(z1|z0) = Bern(sigmoid(g_theta(z0))), p(x|z1) from f_theta.

Pure torch: must not import `runtime`, deepspeed or any I/O.
"""

from __future__ import annotations

import torch
from torch import nn

from symeq_dist.config import Reference28Config
from symeq_dist.models.distributions import Bernoulli, Distribution
from symeq_dist.models.layers import ConvTranspose2d, SkipMLP, XHead, unpack, x_offset_shape
from symeq_dist.models.players import Decoder, Latents, Players


def scale_init(players: Players, gain: float) -> Players:
    """model.init_gain: multiply every weight matrix and kernel (not the biases) of both players by `gain`."""
    if gain != 1.0:
        with torch.no_grad():
            for _, module in players.items():
                for p in module.parameters():
                    if p.dim() >= 2:
                        p.mul_(gain)
    return players


def conv_trunk(width: int) -> nn.Sequential:
    """Reference encoder trunk: (B, 1, 28, 28) -> (B, width), tanh after every layer (METHOD §10)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, 1, padding=1), nn.Tanh(),  # 28
        nn.Conv2d(32, 32, 2, 1), nn.Tanh(),  # 27
        nn.Conv2d(32, 64, 3, 2), nn.Tanh(),  # 13
        nn.Conv2d(64, 64, 3, 1), nn.Tanh(),  # 11
        nn.Conv2d(64, 64, 3, 1), nn.Tanh(),  # 9
        nn.Conv2d(64, 128, 3, 2), nn.Tanh(),  # 4
        nn.Conv2d(128, width, 4, 1), nn.Tanh(),  # 1
        nn.Flatten(1),
    )


def image_net(num_in: int, activation: type[nn.Module]) -> nn.Sequential:
    """Reference f_theta: (B, num_in) -> (B, 1, 28, 28), activation after every layer but the last."""
    return nn.Sequential(
        nn.Unflatten(1, (num_in, 1, 1)),
        ConvTranspose2d(num_in, 128, 4, 1), activation(),  # 4
        ConvTranspose2d(128, 64, 3, 2), activation(),  # 9
        ConvTranspose2d(64, 64, 3, 1), activation(),  # 11
        ConvTranspose2d(64, 64, 3, 1), activation(),  # 13
        ConvTranspose2d(64, 32, 3, 2), activation(),  # 27
        ConvTranspose2d(32, 32, 2, 1), activation(),  # 28
        nn.Conv2d(32, 1, 3, 1, padding=1),  # 28, no activation
    )


class Reference28Decoder(Decoder):
    """z0 ~ Bern(½), p(z1|z0) = Bern(σ(g_theta(z0))), p(x|z1) from f_theta (METHOD §7.2, §10).

    g_theta: SkipMLP num_z0 -> mlp_width -> mlp_width -> num_z1 (tanh). f_theta: the conv-transpose image
    net, tanh for Bernoulli x, ReLU for Gaussian x (Fashion-MNIST, learned log sigma).
    """

    def __init__(self, cfg: Reference28Config) -> None:
        super().__init__()
        self.latent_names = ("z0", "z1")
        self.latent_shapes = {"z0": (cfg.num_z0,), "z1": (cfg.num_z1,)}
        self.top_family = "bernoulli"
        self.prior_net = SkipMLP([cfg.num_z0, cfg.mlp_width, cfg.mlp_width, cfg.num_z1], nn.Tanh)
        self.image_net = image_net(cfg.num_z1, nn.ReLU if cfg.x_dist == "gaussian" else nn.Tanh)
        self.x_head = XHead(cfg.x_dist, cfg.image_shape if cfg.sigma == "per_dim" else (),
                            offset_shape=x_offset_shape(cfg))

    def _latent_conditional(self, name: str, z: Latents) -> Distribution:
        return Bernoulli(self.prior_net(z["z0"]))  # name == "z1": (B, num_z0) -> (B, num_z1) logits

    def _x_dist(self, z: Latents) -> Distribution:
        return unpack(self.x_head(self.image_net(z["z1"])))  # (B, num_z1) -> (B, 1, 28, 28)
