"""The encoder player phi: q(z | x) in a chosen factorisation (single latent, ladder, reverse; METHOD §7).

All public operations go through `forward(op, ...)`, which dispatches to the private `_<op>`: under
DeepSpeed ZeRO-3 parameters are gathered by forward hooks, so a method not entered through `__call__`
would see empty partitioned parameters. Inside a private method other private methods are called
directly, each submodule only through its own `__call__`, and the decoder only through its public ops.
Must not import `dist`, `engines`, deepspeed or any I/O.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from symeq_dist.config import ModelConfig
from symeq_dist.models.blocks import OpModule, SkipMLP, conv_trunk, draw, mlp
from symeq_dist.models.decoder import Decoder
from symeq_dist.models.distributions import Bernoulli, Distribution, Gaussian

Latents = dict[str, Tensor]
Sample = tuple[Latents, dict[str, Distribution]]


class Encoder(OpModule):
    """Base of the encoder player.

    Attributes:
        analytic_kl: True when every q-factor aligns with a p-factor, so the ELBO can use analytic KLs
            (single latent, ladder); False for the reverse order.
    """

    OPS = ("sample", "conditionals")
    analytic_kl: bool

    def sample(self, x: Tensor, decoder: Decoder, generator: torch.Generator | None = None,
               reparam: bool = False) -> Sample:
        """Ancestral pass through the encoder factorisation, x float (B, C, H, W).

        reparam=False: plain sampling (callers wrap it in no_grad); decoder terms are computed under
        no_grad. reparam=True (ELBO): rsample (Gaussian / ZGR) at every layer and decoder terms keep
        their graph, so theta gets gradients through g_theta.

        Returns:
            z for every latent and the q-distributions used, both keyed by latent name.
        """
        return self.call("sample", x, decoder, generator=generator, reparam=reparam)

    def conditionals(self, x: Tensor, z: Latents, decoder: Decoder) -> dict[str, Distribution]:
        """Teacher-forced q-factors given complete (x, z); decoder terms under no_grad (METHOD §7.2)."""
        return self.call("conditionals", x, z, decoder)


class MLPEncoder(Encoder):
    """Single latent "z": MLP prod(image_shape) -> hidden -> hidden (tanh) -> head (METHOD §7.1).

    Gaussian latent: head gives (mu, log_sigma) per sample (2 * num_latents); Bernoulli: num_latents logits.
    """

    def __init__(self, cfg: ModelConfig) -> None:
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
    """q(z0|x) = Bern(σ(s0)), q(z1|z0, x) = Bern(σ(g_theta(z0) + s1)) with g_theta owned by the decoder.

    The encoder holds no copy of g_theta; it calls `decoder.prior_logits` (METHOD §7.2).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.analytic_kl = True
        self.trunk = conv_trunk(cfg.trunk_width)
        self.heads = LadderHeads(cfg.trunk_width, cfg.num_z0, cfg.num_z1)

    def _sample(self, x: Tensor, decoder: Decoder, generator: torch.Generator | None = None,
                reparam: bool = False) -> Sample:
        s0, s1 = self.heads(self.trunk(x))
        q_z0 = Bernoulli(s0)
        z0 = draw(q_z0, generator, reparam)
        if reparam:
            g = decoder.prior_logits(z0)  # ELBO: theta gets gradients through g
        else:
            with torch.no_grad():
                g = decoder.prior_logits(z0)
        q_z1 = Bernoulli(g + s1)
        return {"z0": z0, "z1": draw(q_z1, generator, reparam)}, {"z0": q_z0, "z1": q_z1}

    def _conditionals(self, x: Tensor, z: Latents, decoder: Decoder) -> dict[str, Distribution]:
        s0, s1 = self.heads(self.trunk(x))
        with torch.no_grad():  # detaching rule: g_theta(z0) is a constant in the encoder step
            g = decoder.prior_logits(z["z0"])
        return {"z0": Bernoulli(s0), "z1": Bernoulli(g + s1)}


class ReverseEncoder(Encoder):
    """Wake-sleep order: q(z1|x) = Bern(σ(h_phi(x))), q(z0|z1) = Bern(σ(k_phi(z1))) (METHOD §7.3).

    h_phi: conv trunk + Lin(M -> n1); k_phi: SkipMLP n1 -> w -> w -> w -> n0 (tanh, bias-free skip).
    """

    def __init__(self, cfg: ModelConfig) -> None:
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


def build_encoder(cfg: ModelConfig) -> Encoder:
    """The encoder player for `cfg.kind`."""
    encoders: dict[str, type[Encoder]] = {"mlp": MLPEncoder, "ladder": LadderEncoder, "reverse": ReverseEncoder}
    return encoders[cfg.kind](cfg)
