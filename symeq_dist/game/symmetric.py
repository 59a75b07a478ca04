"""The symmetric game (METHOD §2-4): each player maximises the likelihood of its own conditionals on complete
pairs that the other player generated. Decoder on wake pairs (data completed by q), encoder on dreams (p).

Must not import `runtime`, do I/O, or call `.backward()` / `.step()`.
"""

from __future__ import annotations

from torch import nn

from symeq_dist.game.base import Labelled, Pairs, Round, Terms, complete_data, complete_labelled, dream, nll
from symeq_dist.models.distributions import Distribution
from symeq_dist.models.players import Players
from symeq_dist.priors import Prior


def decoder_loss(decoder: nn.Module, pairs: Pairs) -> Terms:
    """-log p_theta(x, z_{>=1} | z_0) on wake pairs; teacher-forced, one pass even for deep hierarchies."""
    dists = decoder.conditionals(pairs.z)
    return nll(dists, {**pairs.z, "x": pairs.x})


def encoder_loss(encoder: nn.Module, decoder: nn.Module, pairs: Pairs) -> Terms:
    """-log q_phi(z | x) on dream pairs; decoder-computed terms are constants (detached in the encoder)."""
    dists = encoder.conditionals(pairs.x, pairs.z, decoder)
    return nll(dists, pairs.z)


def supervised_loss(encoder: nn.Module, decoder: nn.Module, rows: Labelled, pairs: Pairs) -> Terms:
    """-log q_phi(c | x) of the observed top latent (class, attribute bits or label map): the mean over the rows whose
    mask is 1."""
    top = decoder.latent_names[0]
    q_c = encoder.conditionals(rows.x, pairs.z, decoder)[top]
    observed = rows.mask.float()
    loss = -(q_c.log_prob(rows.c) * observed).sum() / observed.sum().clamp_min(1.0)
    return Terms(loss=loss, stats={f"nll/{top}": loss.detach(), "loss": loss.detach()})


def add_terms(main: Terms, extra: Terms, name: str) -> Terms:
    """The sum of two losses (each its own batch mean, weight 1, METHOD §7.4); `extra`'s stats under `name/`."""
    stats = {**main.stats, **{f"{name}/{k}": v for k, v in extra.stats.items()}}
    stats["loss"] = main.stats["loss"] + extra.stats["loss"]
    return Terms(loss=main.loss + extra.loss, stats=stats)


class SymmetricGame:
    """Two engines, decoder first: its loss completes the data, the encoder's loss dreams (from the updated
    theta under the alternating schedule, from the same theta under the simultaneous one)."""

    def __init__(self, players: Players, prior: Prior) -> None:
        self.players, self.prior = players, prior
        self.modules: dict[str, nn.Module] = {"decoder": players.decoder, "encoder": players.encoder}
        self.losses = {"decoder": self.decoder_loss, "encoder": self.encoder_loss}

    def decoder_loss(self, rnd: Round) -> Terms:
        enc, dec = self.players.encoder, self.players.decoder
        rnd.wake = complete_data(enc, dec, rnd.x, rnd.gens["wake"])
        terms = decoder_loss(dec, rnd.wake)
        if rnd.labelled is None:
            return terms
        # labelled rows (METHOD §7.4): the class clamped, the rest imputed by the encoder; its own batch mean
        rnd.labelled_wake = complete_labelled(enc, dec, rnd.labelled, rnd.gens["wake"])
        return add_terms(terms, decoder_loss(dec, rnd.labelled_wake), "labelled")

    def encoder_loss(self, rnd: Round) -> Terms:
        enc, dec = self.players.encoder, self.players.decoder
        rnd.dreams = dream(dec, self.prior, rnd.num_dreams, rnd.gens["dream"], rnd.x.device)
        terms = encoder_loss(enc, dec, rnd.dreams)
        if rnd.labelled is None or rnd.labelled_wake is None:
            return terms
        return add_terms(terms, supervised_loss(enc, dec, rnd.labelled, rnd.labelled_wake), "supervised")

    def monitored(self, rnd: Round) -> dict[str, dict[str, Distribution]]:
        assert rnd.wake is not None and rnd.dreams is not None, "monitors read a round after both losses"
        return {"encoder": rnd.wake.dists, "decoder": rnd.dreams.dists}
