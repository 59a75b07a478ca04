"""The ELBO baseline (METHOD §9): -[E_q log p(x|z) - KL(q(z|x) || p(z))] on the same networks, one engine over
both players, because its gradient flows from the decoder into the encoder.

Reparametrised (Gaussian) or ZGR (Bernoulli) samples: analytic KL per latent when the encoder's factors
align with the decoder's (single latent, ladder), a one-sample Monte-Carlo KL otherwise (reverse). Needs
the prior's density (`prior.distribution`). Must not import `runtime`, do I/O, or call backward / step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from symeq_dist.game.base import Pairs, Round, Terms, dream
from symeq_dist.models.distributions import Distribution
from symeq_dist.models.players import JointModule, Players
from symeq_dist.priors import Prior


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


class ElboGame:
    """One `joint` engine over both players; a dream is drawn only for the decoder's MI monitor."""

    def __init__(self, players: Players, prior: Prior) -> None:
        self.players, self.prior = players, prior
        self.joint = JointModule(players.encoder, players.decoder)
        self.modules: dict[str, nn.Module] = {"joint": self.joint}
        self.losses = {"joint": self.joint_loss}

    def joint_loss(self, rnd: Round) -> Terms:
        terms, rnd.wake = self.joint(elbo_loss, self.prior, rnd.x, rnd.gens["wake"])
        return terms

    def monitored(self, rnd: Round) -> dict[str, dict[str, Distribution]]:
        assert rnd.wake is not None, "monitors read a round after its loss"
        rnd.dreams = dream(self.players.decoder, self.prior, rnd.num_dreams, rnd.gens["dream"], rnd.x.device)
        return {"encoder": rnd.wake.dists, "decoder": rnd.dreams.dists}
