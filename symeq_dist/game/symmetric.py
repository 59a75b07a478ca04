"""The symmetric game (METHOD §2-4): each player maximises the likelihood of its own conditionals on complete
pairs that the other player generated. Decoder on wake pairs (data completed by q), encoder on dreams (p).

Must not import `runtime`, do I/O, or call `.backward()` / `.step()`.
"""

from __future__ import annotations

from torch import nn

from symeq_dist.game.base import Pairs, Round, Terms, complete_data, dream, nll
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
        return decoder_loss(dec, rnd.wake)

    def encoder_loss(self, rnd: Round) -> Terms:
        enc, dec = self.players.encoder, self.players.decoder
        rnd.dreams = dream(dec, self.prior, rnd.num_dreams, rnd.gens["dream"], rnd.x.device)
        return encoder_loss(enc, dec, rnd.dreams)

    def monitored(self, rnd: Round) -> dict[str, dict[str, Distribution]]:
        assert rnd.wake is not None and rnd.dreams is not None, "monitors read a round after both losses"
        return {"encoder": rnd.wake.dists, "decoder": rnd.dreams.dists}
