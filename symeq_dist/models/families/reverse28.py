"""Family `reverse`: the reference reverse (wake-sleep order) HVAE (METHOD §7.3, §10).

Encoder without sharing: q(z1|x) = Bern(σ(h_phi(x))), q(z0|z1) = Bern(σ(k_phi(z1))); it samples z1, then
z0. Decoder: the reference two-layer decoder (Bernoulli x). Pure torch: no `runtime`, deepspeed or I/O.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from symeq_dist.config import Reverse28Config
from symeq_dist.models.distributions import Bernoulli, Distribution
from symeq_dist.models.families.ref28 import Reference28Decoder, conv_trunk, scale_init
from symeq_dist.models.layers import SkipMLP, draw
from symeq_dist.models.players import Decoder, Encoder, Latents, Players, Sample


class ReverseEncoder(Encoder):
    """h_phi: conv trunk + Lin(M -> n1); k_phi: SkipMLP n1 -> w -> w -> w -> n0 (tanh, bias-free skip)."""

    def __init__(self, cfg: Reverse28Config) -> None:
        super().__init__()
        self.analytic_kl = False
        self.z1_net = nn.Sequential(conv_trunk(cfg.trunk_width), nn.Linear(cfg.trunk_width, cfg.num_z1))
        w = cfg.mlp_width
        self.z0_net = SkipMLP([cfg.num_z1, w, w, w, cfg.num_z0], nn.Tanh)

    def _sample(self, x: Tensor, decoder: Decoder, generator: torch.Generator | None = None,
                reparam: bool = False) -> Sample:
        q_z1 = Bernoulli(self.z1_net(x))
        z1 = draw(q_z1, generator, reparam)
        q_z0 = Bernoulli(self.z0_net(z1))
        return {"z0": draw(q_z0, generator, reparam), "z1": z1}, {"z0": q_z0, "z1": q_z1}

    def _conditionals(self, x: Tensor, z: Latents, decoder: Decoder) -> dict[str, Distribution]:
        return {"z0": Bernoulli(self.z0_net(z["z1"])), "z1": Bernoulli(self.z1_net(x))}


def build_players(cfg: Reverse28Config) -> Players:
    return scale_init(Players(encoder=ReverseEncoder(cfg), decoder=Reference28Decoder(cfg)), cfg.init_gain)
