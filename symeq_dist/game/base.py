"""What every game shares: complete (x, z) pairs drawn, detached, from one player for the other; a player's
loss record (`Terms`); one micro-batch round (`Round`); and the `Game` interface the trainer drives.

Must not import `runtime`, do I/O, or call `.backward()` / `.step()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from symeq_dist.models.distributions import Distribution
from symeq_dist.priors import Prior


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


@dataclass
class Labelled:
    """Rows whose top latent is observed (METHOD §7.4, §7.6): x, its value c (a class, attribute bits or a label map),
    and a mask (1 = observed; a row with 0 is an unlabelled row)."""

    x: Tensor     # (b_l, C, H, W)
    c: Tensor     # (b_l, K) one-hot class or 0/1 attributes, or (b_l, K, H, W) one-hot label map
    mask: Tensor  # (b_l,)


@dataclass
class Round:
    """One micro-batch of a game: its inputs, and the pairs the losses draw (kept for the monitors).

    `gens` are the trainer's per-purpose generators ("wake", "dream", ...): a round draws from them only,
    so ranks draw different samples and a resumed run draws the same ones.
    """

    x: Tensor                                   # (b, C, H, W) data with training noise
    num_dreams: int                             # dreamed batch size (= the data micro batch)
    gens: dict[str, torch.Generator]
    wake: Pairs | None = None                   # data completed by the encoder
    dreams: Pairs | None = None                 # samples of the decoder
    labelled: Labelled | None = None            # semi-supervised runs: rows with an observed class
    labelled_wake: Pairs | None = None          # those rows completed by the encoder, the class clamped


class Game(Protocol):
    """A game as the trainer drives it (`train/trainer.py` has the step order).

    Attributes:
        modules: engine name -> the module that engine trains, in update order (alternating schedule:
            the first steps first and the next loss is computed after that step).
        losses: engine name -> loss of that engine on a round; never calls backward or step.
    """

    modules: dict[str, nn.Module]
    losses: dict[str, Callable[[Round], Terms]]

    def monitored(self, rnd: Round) -> dict[str, dict[str, Distribution]]:
        """player -> the distributions whose mutual information the monitors track, for this round."""
        ...


@torch.no_grad()
def complete_data(encoder: nn.Module, decoder: nn.Module, x: Tensor, generator: torch.Generator) -> Pairs:
    """Wake pairs: data x completed with z ~ q_phi(z|x) (ancestral, detached)."""
    z, dists = encoder.sample(x, decoder, generator)
    return Pairs(x=x, z=z, dists=dists)


@torch.no_grad()
def complete_labelled(encoder: nn.Module, decoder: nn.Module, rows: Labelled, generator: torch.Generator) -> Pairs:
    """Labelled wake pairs: the top latent clamped to the label where observed, the rest z ~ q_phi (detached)."""
    top = decoder.latent_names[0]
    z, dists = encoder.sample(rows.x, decoder, generator, observed={top: rows.c, f"{top}_mask": rows.mask})
    return Pairs(x=rows.x, z=z, dists=dists)


@torch.no_grad()
def dream(decoder: nn.Module, prior: Prior, num: int, generator: torch.Generator,
          device: torch.device) -> Pairs:
    """Dream pairs: z_0 ~ pi(z_0) (the prior's next codes), then z_{>=1} and x ~ p_theta ancestrally (detached)."""
    z_top = prior.next_codes(num, generator, device)
    z, x, dists = decoder.sample(z_top, generator)
    return Pairs(x=x, z=z, dists=dists)


def nll(dists: dict[str, Distribution], values: dict[str, Tensor]) -> Terms:
    """Sum over factors of the batch-mean negative log-likelihood; per-factor and per-dimension stats."""
    loss = torch.zeros((), device=next(iter(values.values())).device)
    stats: dict[str, Tensor] = {}
    for name, dist in dists.items():
        value = values[name]
        term = -dist.log_prob(value).mean()
        loss = loss + term
        stats[f"nll/{name}"] = term.detach()
        stats[f"nll_per_dim/{name}"] = term.detach() / (value[0].numel() if value.dim() > 1 else 1)
    stats["loss"] = loss.detach()
    return Terms(loss=loss, stats=stats)
