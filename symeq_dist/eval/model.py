"""A trained run as plain modules: its config, the weights of its latest (or a given) checkpoint, its prior.

Used by `symeq eval` and `symeq sample` (through `symeq_dist.api`). Must not import `train`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from symeq_dist.config import PriorConfig, RunConfig, config_from_dict
from symeq_dist.models import Players, build_players
from symeq_dist.priors import Prior, build_prior
from symeq_dist.runtime import checkpoint, dist


@dataclass(frozen=True)
class TrainedModel:
    cfg: RunConfig
    step: int
    ema: bool
    """Whether the players hold the run's averaged weights (`train.ema_decay`) rather than the trained ones."""
    players: Players
    prior: Prior
    device: torch.device

    @property
    def encoder(self) -> torch.nn.Module:
        return self.players.encoder

    @property
    def decoder(self) -> torch.nn.Module:
        return self.players.decoder


def load_trained(run_dir: Path, device: torch.device | None = None, *, ema: bool = True,
                 step: int | None = None) -> TrainedModel:
    """Players with the weights of the latest checkpoint (or of checkpoint `step`), in eval mode, on `device`
    (default: the accelerator when there is one, else the CPU: `runtime.dist.local_device`); the averaged weights
    when the run keeps them and `ema` (the default), else the trained ones.

    Raises:
        CheckpointError: the run has no checkpoint (of that step), or its files do not load.
    """
    device = device or dist.local_device()
    meta = checkpoint.load_meta(run_dir, step)
    cfg = config_from_dict(meta["config"])
    players = build_players(cfg.model)
    # the weights of the step whose config was read: "latest" may move on while a run is still training
    step, used_ema = checkpoint.load_weights(run_dir, players.encoder, players.decoder, ema=ema,
                                             step=int(meta["step"]))
    for _, module in players.items():
        module.to(device).eval()
    return TrainedModel(cfg=cfg, step=step, ema=used_ema, players=players,
                        prior=build_prior(cfg.prior, players.decoder, device=device), device=device)


def with_prior(model: TrainedModel, path: Path) -> TrainedModel:
    """The model with another prior in place of its run's own (`--prior PATH` of `symeq eval` and `symeq sample`: a
    run decoded from a separately trained prior): a prior run (it has checkpoints/) or a latent shard set, checked
    against the decoder's top latent."""
    kind = "model" if (Path(path) / "checkpoints").is_dir() else "shards"
    cfg = PriorConfig(kind=kind, **({"run": str(path)} if kind == "model" else {"shards": str(path)}))
    return replace(model, prior=build_prior(cfg, model.decoder, device=model.device))
