"""The mutual-information collapse monitors (METHOD.md §13.3): per-dimension MI of every factor of both players.

Pure torch: must not import `runtime` or tensorboard.
"""

from __future__ import annotations

import torch
from torch import Tensor

from symeq_dist.models.distributions import Distribution

DEAD_MI = 0.01  # nats: a latent dimension below this carries (almost) no information: collapsed


class MIMonitor:
    """EMA of per-dimension mutual information for every factor of both players.

    Encoder factors are measured on data batches (I(z_t; x)), decoder factors on dreamed batches
    (I(z_t; z_{<t}) and I(x; z)): a decoder whose p(x|z) ignores z has MI ~ 0 on every pixel, the
    collapsed equilibrium of METHOD.md §6. Each batch gives an estimate with the batch mixture as the
    marginal; the EMA (decay `decay`, first value taken as is) smooths it over iterations.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.ema: dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, player: str, dists: dict[str, Distribution]) -> None:
        for name, dist in dists.items():
            key = f"{player}/{name}"
            mi = dist.mutual_information()
            if mi is None:  # a factor whose MI is not measured (e.g. the 256-way pixels of a logistic mixture)
                continue
            mi = mi.float()
            old = self.ema.get(key)
            self.ema[key] = mi if old is None else self.decay * old + (1 - self.decay) * mi

    def summary(self) -> dict[str, Tensor]:
        """train/<player>/mi/<factor>_{mean,min,dead_frac} as scalar tensors."""
        out: dict[str, Tensor] = {}
        for key, mi in self.ema.items():
            player, name = key.split("/", 1)
            prefix = f"train/{player}/mi/{name}"
            out[f"{prefix}_mean"] = mi.mean()
            out[f"{prefix}_min"] = mi.min()
            out[f"{prefix}_dead_frac"] = (mi < DEAD_MI).float().mean()
        return out

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in self.ema.items()}

    def load_state_dict(self, state: dict[str, Tensor], device: torch.device) -> None:
        self.ema = {k: v.to(device) for k, v in state.items()}
