"""Family `ladder`: the reference MNIST / Fashion-MNIST ladder HVAE (METHOD §7.2, §10).

q(z0|x) = Bern(σ(s0)), q(z1|z0, x) = Bern(σ(g_theta(z0) + s1)): the z1 factor adds the encoder's s1 to the
natural parameters of the decoder's p(z1|z0). The encoder holds no copy of g_theta: it gets the
decoder's conditionals from ONE `decoder.top_down` call per pass (sampling, or teacher-forced on dreams).
Detaching rule: in the encoder step (teacher-forced on dreams) that call runs under no_grad, and while
sampling the encoder adds the detached g_theta(z0), so g_theta is a constant and the encoder trains R_phi
only; in the ELBO (reparam) g_theta keeps its graph and theta gets gradients through it.
Pure torch: must not import `runtime`, deepspeed or any I/O.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from symeq_dist.config import Ladder28Config
from symeq_dist.models.distributions import Bernoulli, Distribution
from symeq_dist.models.families.ref28 import Reference28Decoder, conv_trunk, scale_init
from symeq_dist.models.layers import mlp
from symeq_dist.models.players import Decoder, Encoder, Latents, Players, Sample


class LadderHeads(nn.Module):
    """(s0, s1) = R_phi heads on the trunk output h (METHOD §10).

    s1 = Lin(M -> n1)(h); s0 = Lin(M -> n0)(tanh Lin(M -> M)(tanh Lin(M -> M)(h))) + bias-free
    Lin(n1 -> n0)(s1): the skip reads the logits s1, not samples.
    """

    def __init__(self, width: int, num_z0: int, num_z1: int) -> None:
        super().__init__()
        self.s1 = nn.Linear(width, num_z1)
        self.s0 = mlp([width, width, width, num_z0], nn.Tanh, final_activation=False)
        self.skip = nn.Linear(num_z1, num_z0, bias=False)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:  # (B, M) -> (B, n0), (B, n1)
        s1 = self.s1(h)
        return self.s0(h) + self.skip(s1), s1


class LadderEncoder(Encoder):
    """R_phi = conv trunk + ladder heads; q's z1 factor shares the decoder's g_theta (see module docstring)."""

    def __init__(self, cfg: Ladder28Config) -> None:
        super().__init__()
        self.analytic_kl = True
        self.trunk = conv_trunk(cfg.trunk_width)
        self.heads = LadderHeads(cfg.trunk_width, cfg.num_z0, cfg.num_z1)

    def _sample(self, x: Tensor, decoder: Decoder, generator: torch.Generator | None = None,
                reparam: bool = False) -> Sample:
        s0, s1 = self.heads(self.trunk(x))
        q: dict[str, Distribution] = {}

        def posterior(name: str, p: Distribution | None, state: Tensor | None) -> Distribution:
            if p is None:
                q[name] = Bernoulli(s0)
            else:  # ELBO (reparam): theta gets gradients through g_theta; otherwise g_theta is a constant
                q[name] = Bernoulli((p.logits if reparam else p.logits.detach()) + s1)
            return q[name]

        z = decoder.top_down(posterior=posterior, generator=generator, reparam=reparam).z
        return z, q

    def _conditionals(self, x: Tensor, z: Latents, decoder: Decoder) -> dict[str, Distribution]:
        s0, s1 = self.heads(self.trunk(x))
        with torch.no_grad():  # detaching rule: the decoder's p(z1|z0) is a constant in the encoder step
            p = decoder.top_down(z).priors
        return {"z0": Bernoulli(s0), "z1": Bernoulli(p["z1"].logits + s1)}


def build_players(cfg: Ladder28Config) -> Players:
    return scale_init(Players(encoder=LadderEncoder(cfg), decoder=Reference28Decoder(cfg)), cfg.init_gain)
