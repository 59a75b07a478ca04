r"""The games: each player's utility as a loss on complete (x, z) pairs drawn, detached, from the other player.

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

Rooms: `base.py` (pairs, rounds, the `Game` interface), `symmetric.py` (the game above, two engines),
`elbo.py` (the ELBO baseline on the same networks, one joint engine), `mi.py` (collapse monitors).
`GAMES` maps `game.kind` to a game class (docs/extending.md: adding a game).

A game receives plain modules and returns losses and statistics; it never calls `.backward()` or
`.step()` (the trainer does, in the order `game.schedule` fixes) and does no I/O.
"""

from __future__ import annotations

from symeq_dist.config import GameConfig
from symeq_dist.game.base import Game, Labelled, Pairs, Round, Terms, complete_data, dream, nll
from symeq_dist.game.elbo import ElboGame, elbo_loss
from symeq_dist.game.mi import DEAD_MI, MIMonitor
from symeq_dist.game.symmetric import SymmetricGame, decoder_loss, encoder_loss
from symeq_dist.models.players import Players
from symeq_dist.priors import Prior

GAMES: dict[str, type] = {"symmetric": SymmetricGame, "elbo": ElboGame}


def build_game(cfg: GameConfig, players: Players, prior: Prior) -> Game:
    """The game `cfg.kind` over these players and this prior."""
    return GAMES[cfg.kind](players, prior)


__all__ = [
    "DEAD_MI", "GAMES", "ElboGame", "Game", "Labelled", "MIMonitor", "Pairs", "Round", "SymmetricGame", "Terms",
    "build_game",
    "complete_data", "decoder_loss", "dream", "elbo_loss", "encoder_loss", "nll",
]
