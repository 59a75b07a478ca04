r"""The game: each player's utility as a loss on complete (x, z) pairs drawn, detached, from the other player.

Symmetric Equilibrium Learning (Flach, Schlesinger, Shekhovtsov, AISTATS 2024; ../shared/METHOD.md §2-4):

    decoder (theta) maximises  L_p = E_{x~pi(x)} E_{z~q_phi(z|x)} [ log p_theta(x, z) ]
    encoder (phi)   maximises  L_q = E_{z~pi(z)} E_{x~p_theta(x|z)} [ log q_phi(z|x) ]

with z = (z_0, ..., z_m) ancestral (the top z_0 ~ pi has no parameters; its log-density is never needed,
so pi may be implicit). Both gradients are plain maximum-likelihood gradients on synthetic complete data:

    grad_theta L_p ~ 1/B sum_b grad_theta log p_theta(x_b, z_b),  x_b ~ data,  z_b ~ q_phi(.|x_b)   (wake)
    grad_phi   L_q ~ 1/B sum_b grad_phi   log q_phi(z_b | x_b),   z_b ~ pi,    x_b ~ p_theta(.|z_b) (dream)

Every cross-player sample is drawn under no_grad; every tensor a module of the other player computes
enters a loss as a constant (the ladder encoder's use of g_theta is detached inside the encoder). A
player's loss is the negative utility per sample in nats: -(sum over factors and dimensions of
log-likelihood), averaged over the batch. All terms have weight 1.

The ELBO baseline (`elbo_loss`) trains the same networks on -[E_q log p(x|z) - KL(q(z|x) || p(z))] with
reparametrised (Gaussian) or ZGR (Bernoulli) samples: analytic KL per latent when the encoder's factors
align with the decoder's (single latent, ladder), a one-sample Monte-Carlo KL otherwise (reverse).

This module receives plain modules and returns losses and statistics; it never calls `.backward()` or
`.step()` (the trainer does, in the order `game.schedule` fixes) and does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from symeq_dist.models.distributions import Distribution
from symeq_dist.prior import Prior


@dataclass
class Terms:
    """One player's loss (scalar, with grad) and detached statistics (scalars, in nats)."""

    loss: Tensor
    stats: dict[str, Tensor]


@dataclass
class Pairs:
    """Complete samples (x, z) and the distributions that generated them (for the MI monitors)."""

    x: Tensor                       # (B, C, H, W)
    z: dict[str, Tensor]            # latent name -> (B, ...)
    dists: dict[str, Distribution]  # factor name -> distribution over the batch


@torch.no_grad()
def complete_data(encoder: nn.Module, decoder: nn.Module, x: Tensor, generator: torch.Generator) -> Pairs:
    """Wake pairs: data x completed with z ~ q_phi(z|x) (ancestral, detached)."""
    z, dists = encoder.sample(x, decoder, generator)
    return Pairs(x=x, z=z, dists=dists)


@torch.no_grad()
def dream(decoder: nn.Module, prior: Prior, num: int, generator: torch.Generator,
          device: torch.device) -> Pairs:
    """Dream pairs: z_0 ~ pi(z_0), then z_{>=1} and x ~ p_theta ancestrally (detached)."""
    z_top = prior.sample(num, generator, device)
    z, x, dists = decoder.sample(z_top, generator)
    return Pairs(x=x, z=z, dists=dists)


def _nll(dists: dict[str, Distribution], values: dict[str, Tensor]) -> Terms:
    """Sum over factors of the batch-mean negative log-likelihood; per-factor and per-dimension stats."""
    loss = torch.zeros((), device=next(iter(values.values())).device)
    stats: dict[str, Tensor] = {}
    for name, dist in dists.items():
        value = values[name]
        nll = -dist.log_prob(value).mean()
        loss = loss + nll
        stats[f"nll/{name}"] = nll.detach()
        stats[f"nll_per_dim/{name}"] = nll.detach() / (value[0].numel() if value.dim() > 1 else 1)
    stats["loss"] = loss.detach()
    return Terms(loss=loss, stats=stats)


def decoder_loss(decoder: nn.Module, pairs: Pairs) -> Terms:
    """-log p_theta(x, z_{>=1} | z_0) on wake pairs; teacher-forced, one pass even for deep hierarchies."""
    dists = decoder.conditionals(pairs.z)
    return _nll(dists, {**pairs.z, "x": pairs.x})


def encoder_loss(encoder: nn.Module, decoder: nn.Module, pairs: Pairs) -> Terms:
    """-log q_phi(z | x) on dream pairs; decoder-computed terms are constants (detached in the encoder)."""
    dists = encoder.conditionals(pairs.x, pairs.z, decoder)
    return _nll(dists, pairs.z)


def elbo_loss(encoder: nn.Module, decoder: nn.Module, prior: Prior, x: Tensor,
              generator: torch.Generator) -> tuple[Terms, Pairs]:
    """Negative ELBO per sample (nats) with one reparametrised/ZGR sample; gradients reach both players.

    Returns the terms and the (detached) wake pairs with the encoder's distributions, for the monitors.
    """
    z, q_dists = encoder.sample(x, decoder, generator, reparam=True)
    p_dists = dict(decoder.conditionals(z))
    top = decoder.latent_names[0]
    p_dists[top] = prior.distribution(x.shape[0], x.device)
    nll_x = -p_dists["x"].log_prob(x).mean()
    loss, stats = nll_x, {"nll/x": nll_x.detach()}
    for name in decoder.latent_names:
        if encoder.analytic_kl:
            kl = q_dists[name].kl(p_dists[name]).mean()
        else:  # one-sample Monte-Carlo KL (reverse order: q's factors do not align with p's)
            kl = (q_dists[name].log_prob(z[name]) - p_dists[name].log_prob(z[name])).mean()
        loss = loss + kl
        stats[f"kl/{name}"] = kl.detach()
    stats["loss"] = loss.detach()
    pairs = Pairs(x=x, z={k: v.detach() for k, v in z.items()}, dists=q_dists)
    return Terms(loss=loss, stats=stats), pairs
