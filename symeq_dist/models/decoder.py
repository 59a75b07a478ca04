"""The decoder player theta: p(z_t | z_<t) for the non-top latents and p(x | z) (METHOD §1, §7, §10).

All public operations go through `forward(op, ...)`, which dispatches to the private `_<op>`: under
DeepSpeed ZeRO-3 parameters are gathered by forward hooks, so a method not entered through `__call__`
would see empty partitioned parameters. Inside a private method other private methods are called
directly, and each submodule only through its own `__call__`. Must not import `dist`, `engines`,
deepspeed or any I/O.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from symeq_dist.config import ModelConfig
from symeq_dist.models.blocks import OpModule, SkipMLP, XHead, draw, image_net, mlp, unpack
from symeq_dist.models.distributions import Bernoulli, Distribution

Latents = dict[str, Tensor]


class Decoder(OpModule):
    """Base of the decoder player.

    Attributes:
        latent_names: ancestral order, top first: ("z",) or ("z0", "z1").
        latent_shapes: event shape per latent, e.g. {"z0": (30,), "z1": (100,)}.
        top_family: "bernoulli" or "gaussian": the family of the top latent (the prior's).
    """

    OPS = ("conditionals", "sample", "x_dist", "prior_logits")
    latent_names: tuple[str, ...]
    latent_shapes: dict[str, tuple[int, ...]]
    top_family: str

    def conditionals(self, z: Latents) -> dict[str, Distribution]:
        """Teacher-forced p(z_t | z_<t) for every non-top latent, and "x": p(x | z); with grad."""
        return self.call("conditionals", z)

    def sample(self, z_top: Tensor, generator: torch.Generator | None = None,
               reparam: bool = False) -> tuple[Latents, Tensor, dict[str, Distribution]]:
        """Ancestral sample from the given top latent.

        Returns:
            z for every latent (the given top included), x sampled from p(x|z) (never its mean), and the
            distributions used, keyed like `conditionals`. reparam=True draws with `rsample`.
        """
        return self.call("sample", z_top, generator=generator, reparam=reparam)

    def x_dist(self, z: Latents) -> Distribution:
        """p(x | z) only."""
        return self.call("x_dist", z)

    def prior_logits(self, z0: Tensor) -> Tensor:
        """Hierarchical only: g_theta(z0), (B, num_z0) -> (B, num_z1) logits of p(z1 | z0)."""
        return self.call("prior_logits", z0)

    def _prior_logits(self, z0: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has a single latent; prior_logits exists only for "
                                  "hierarchical decoders (model.kind=ladder or reverse)")


class MLPDecoder(Decoder):
    """Single latent "z": MLP num_latents -> hidden -> hidden (tanh) -> prod(image_shape) (METHOD §7.1)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.latent_names = ("z",)
        self.latent_shapes = {"z": (cfg.num_latents,)}
        self.top_family = cfg.latent
        sizes = [cfg.num_latents, cfg.hidden, cfg.hidden, math.prod(cfg.image_shape)]
        self.net = nn.Sequential(mlp(sizes, nn.Tanh, final_activation=False), nn.Unflatten(1, cfg.image_shape))
        sigma_shape = cfg.image_shape if cfg.sigma == "per_dim" else ()
        self.x_head = XHead(cfg.x_dist, sigma_shape)

    def _x_dist(self, z: Latents) -> Distribution:
        return unpack(self.x_head(self.net(z["z"])))  # (B, num_latents) -> (B, C, H, W)

    def _conditionals(self, z: Latents) -> dict[str, Distribution]:
        return {"x": self._x_dist(z)}

    def _sample(self, z_top: Tensor, generator: torch.Generator | None = None,
                reparam: bool = False) -> tuple[Latents, Tensor, dict[str, Distribution]]:
        z = {"z": z_top}
        p_x = self._x_dist(z)
        return z, draw(p_x, generator, reparam), {"x": p_x}


class HierarchicalDecoder(Decoder):
    """Reference two-layer decoder: z0 ~ Bern(½), p(z1|z0) = Bern(σ(g_theta(z0))), p(x|z1) from f_theta.

    g_theta: SkipMLP num_z0 -> mlp_width -> mlp_width -> num_z1 (tanh). f_theta: the conv-transpose image
    net, tanh for Bernoulli x, ReLU for Gaussian x (Fashion-MNIST, learned log sigma) (METHOD §10).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.latent_names = ("z0", "z1")
        self.latent_shapes = {"z0": (cfg.num_z0,), "z1": (cfg.num_z1,)}
        self.top_family = "bernoulli"
        self.prior_net = SkipMLP([cfg.num_z0, cfg.mlp_width, cfg.mlp_width, cfg.num_z1], nn.Tanh)
        self.image_net = image_net(cfg.num_z1, nn.ReLU if cfg.x_dist == "gaussian" else nn.Tanh)
        self.x_head = XHead(cfg.x_dist, cfg.image_shape if cfg.sigma == "per_dim" else ())

    def _prior_logits(self, z0: Tensor) -> Tensor:
        return self.prior_net(z0)  # (B, num_z0) -> (B, num_z1)

    def _x_dist(self, z: Latents) -> Distribution:
        return unpack(self.x_head(self.image_net(z["z1"])))  # (B, num_z1) -> (B, 1, 28, 28)

    def _conditionals(self, z: Latents) -> dict[str, Distribution]:
        return {"z1": Bernoulli(self._prior_logits(z["z0"])), "x": self._x_dist(z)}

    def _sample(self, z_top: Tensor, generator: torch.Generator | None = None,
                reparam: bool = False) -> tuple[Latents, Tensor, dict[str, Distribution]]:
        p_z1 = Bernoulli(self._prior_logits(z_top))
        z = {"z0": z_top, "z1": draw(p_z1, generator, reparam)}
        p_x = self._x_dist(z)
        return z, draw(p_x, generator, reparam), {"z1": p_z1, "x": p_x}


def build_decoder(cfg: ModelConfig) -> Decoder:
    """The decoder player for `cfg.kind` (mlp, or the shared ladder/reverse decoder)."""
    return MLPDecoder(cfg) if cfg.kind == "mlp" else HierarchicalDecoder(cfg)
