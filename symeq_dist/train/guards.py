"""Guards that keep a bad update out on every rank: the non-finite loss check and the gradient-spike guard.

`GradGuard`: the local gradient norm of each player's backward on each rank (tensor hooks, so it is the
rank's own gradient before DeepSpeed reduces it). An update is bad when that norm is not finite or exceeds
`game.grad_spike` x the running mean of the accepted norms; ranks agree, and a bad update is discarded
everywhere before any engine steps it. Must not import models or data.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """A loss was NaN/inf on some rank and the policy (or the skip cap) says stop."""


class GradGuard:
    """Per-player local gradient norms from tensor hooks, and the spike test against their running mean.

    Args:
        modules: player name -> module whose parameters are watched.
        factor: a norm above factor x running mean is a spike.
        warmup: accepted norms needed before the spike test starts.
        state: player -> [count, mean], restored from a checkpoint (kept in TrainState).
    """

    def __init__(self, modules: dict[str, torch.nn.Module], *, factor: float, warmup: int,
                 state: dict[str, list[float]]) -> None:
        self.factor, self.warmup, self.state = factor, warmup, state
        self._sq: dict[str, Tensor] = {}
        for name, module in modules.items():
            self.state.setdefault(name, [0, 0.0])
            for param in module.parameters():
                if param.requires_grad:
                    param.register_hook(self._hook(name))

    def _hook(self, name: str) -> Any:
        def add(grad: Tensor) -> None:
            square = grad.detach().float().pow(2).sum()
            self._sq[name] = self._sq[name] + square if name in self._sq else square
        return add

    def take(self, name: str) -> float:
        """The local gradient norm of `name`'s backwards since the last take: the root of their summed squares."""
        square = self._sq.pop(name, None)
        return 0.0 if square is None else float(square.sqrt())

    def is_bad(self, name: str, norm: float) -> bool:
        count, mean = self.state[name]
        if not torch.isfinite(torch.tensor(norm)):
            return True
        return count >= self.warmup and norm > self.factor * mean

    def accept(self, name: str, norm: float) -> None:
        count, mean = self.state[name]
        count += 1
        rate = 1.0 / count if count <= self.warmup else 0.02  # mean of the warm-up, then an EMA
        self.state[name] = [count, mean + rate * (norm - mean)]
