"""Exponential moving averages of both players' weights (`train.ema_decay`), for sampling and evaluation.

After every applied update, ema <- decay * ema + (1 - decay) * w, in fp32 (under bf16, w is the module's bf16
weight; the optimiser's fp32 masters would need a gather per step). At ZeRO 0-2 every rank holds the full
parameters and averages all of them (the ranks' averages are identical). At ZeRO-3 a rank holds only its
partition of each parameter (`param.ds_tensor`) and averages just that: no gather per step. The full averages
are gathered only when a checkpoint is written (collective), stored in `weights.pt` under "ema" (what
`symeq sample` and `symeq eval` read, and what a resume, on any number of ranks, slices its partitions from).
Must not import game or data.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from symeq_dist.runtime.dist import DistInfo, all_gather
from symeq_dist.runtime.engines import Engines, player_state


def _local(param: nn.Parameter) -> Tensor:
    """The part of `param` this rank holds: its ZeRO-3 partition (flat, padded), else the whole tensor."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class EMA:
    """fp32 averages of every engine's parameters; `update` after an applied step, `full` at checkpoints."""

    def __init__(self, engines: Engines, decay: float, info: DistInfo) -> None:
        self.decay, self.info = decay, info
        self.params = {name: dict(engine.module.named_parameters()) for name, engine in engines.items()}
        self.shadow = {name: {key: _local(p).detach().float().clone() for key, p in params.items()}
                       for name, params in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, params in self.params.items():
            for key, param in params.items():
                self.shadow[name][key].mul_(self.decay).add_(_local(param).float(), alpha=1.0 - self.decay)

    def full(self) -> dict[str, dict[str, Tensor]]:
        """Player -> full fp32 state dict of the averages, on the CPU, on every rank (collective at ZeRO-3)."""
        out: dict[str, dict[str, Tensor]] = {}
        for name, params in self.params.items():
            state = {}
            for key, param in params.items():
                value = self.shadow[name][key]
                if hasattr(param, "ds_tensor"):  # gather the partitions, drop the padding, restore the shape
                    value = all_gather(value.reshape(1, -1), self.info).reshape(-1)[:param.ds_numel]
                    value = value.reshape(param.ds_shape)
                state[key] = value.cpu().clone()
            out[name] = state
        return player_state(out)

    def load_full(self, players: dict[str, dict[str, Tensor]]) -> None:
        """Restore from `full()`'s output (any number of ranks wrote it): each rank takes its partition."""
        by_engine = {name: {key: self._own(param, _pick(players, name, key)) for key, param in params.items()}
                     for name, params in self.params.items()}
        for name, state in by_engine.items():
            for key, value in state.items():
                self.shadow[name][key].copy_(value)

    def _own(self, param: nn.Parameter, full: Tensor) -> Tensor:
        if not hasattr(param, "ds_tensor"):
            return full
        size = param.ds_tensor.numel()
        flat = torch.zeros(size * self.info.world_size, dtype=full.dtype)
        flat[:full.numel()] = full.reshape(-1)
        return flat[self.info.rank * size:(self.info.rank + 1) * size]


def _pick(players: dict[str, dict[str, Tensor]], engine: str, key: str) -> Tensor:
    """The average of engine `engine`'s parameter `key` in a player-keyed state (a joint engine's keys are
    "<player>.<parameter>")."""
    if engine in players:
        return players[engine][key]
    player, _, rest = key.partition(".")
    return players[player][rest]
