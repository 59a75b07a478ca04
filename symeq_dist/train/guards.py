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

    def take(self, name: str) -> Tensor:
        """The local gradient norm of `name`'s backwards since the last take (the root of their summed squares),
        as a 0-dim float32 tensor on the gradients' device: reading it is left to the caller (one host sync)."""
        square = self._sq.pop(name, None)
        return torch.zeros(()) if square is None else square.sqrt()

    def bad(self, names: list[str], norms: Tensor) -> Tensor:
        """(len(names),) bool, on norms' device: a norm that is not finite, or, after the warm-up, above
        factor x the running mean of `name`'s accepted norms."""
        limits = [self.factor * mean if count >= self.warmup else float("inf")
                  for count, mean in (self.state[name] for name in names)]
        limit = torch.tensor(limits, dtype=torch.float64, device=norms.device)  # float64: as Python's comparison
        return ~torch.isfinite(norms) | (norms.double() > limit)

    def accept(self, name: str, norm: float) -> None:
        count, mean = self.state[name]
        count += 1
        rate = 1.0 / count if count <= self.warmup else 0.02  # mean of the warm-up, then an EMA
        self.state[name] = [count, mean + rate * (norm - mean)]
