"""Implicit priors: pi(z) known only through samples (METHOD §7.5). The ELBO game cannot use them (no log pi).

Two sources, both behind the `Prior` interface of `priors/__init__.py`:

- `ModelPrior` (`prior.kind=model`): a frozen `symeq prior train` run, the same module on every rank, sampled
  under no_grad with the generator the caller passes (the game: the rank's dream generator, so draws differ per
  rank and a resume repeats them). Nothing is sharded, so it works beside players at any ZeRO stage.
  `prior.refresh_every = k` draws k steps' codes at once into a buffer that is part of the rank's checkpoint.
- `ShardPrior` (`prior.kind=shards`): a latent shard set streamed by the data stream's machinery (one global
  order of its own seed, exactly B codes per rank per round, resumable exactly at any number of ranks).

`next_codes` is what the game's dreams consume (stateful for these two); `sample` is for grids, monitoring
chains and evaluation and never moves the game's stream or buffer (for shards: codes drawn with replacement
from the first `POOL` codes of the split).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from symeq_dist.config import ConfigError, PriorConfig
from symeq_dist.data import load_manifest
from symeq_dist.data.stream import open_train_stream
from symeq_dist.models.distributions import Distribution

POOL = 10000
_STREAM_SEED = 0x5EED13  # added to the run's seed: the codes' order is not the data's order


def no_density(kind: str) -> ConfigError:
    return ConfigError(f"prior.kind={kind}: this prior is known only through samples, and the ELBO game needs its "
                       "density log pi(z) for the KL term; use game.kind=symmetric (the game that needs only samples) "
                       "or a closed-form prior (prior.kind=auto)")


@dataclass(frozen=True)
class StreamSpec:
    """Where this rank's streamed prior codes come from: the run's seed and the game's per-rank round size."""

    seed: int
    rank: int
    world_size: int
    batch_size: int


class ModelPrior:
    """pi(z) := samples of a trained prior model (frozen)."""

    has_density = False

    def __init__(self, run_dir: str | Path, *, refresh_every: int = 1, sample_steps: int = 0,
                 device: torch.device | None = None) -> None:
        from symeq_dist.priors.trainer import load_prior

        trained = load_prior(run_dir, device=device, sample_steps=sample_steps)
        self.model, self.shape, self.family = trained.model, trained.shape, trained.family
        self.source = f"prior run {run_dir} (step {trained.step}, {'averaged' if trained.ema else 'trained'} weights)"
        if sample_steps:
            self.source += f", {sample_steps} DDIM steps"
        self.refresh_every = refresh_every
        self._buffer: Tensor | None = None

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
        return self.model.to(device).sample(n, generator, device)

    def next_codes(self, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
        if self.refresh_every == 1:
            return self.sample(n, generator, device)
        if self._buffer is None or len(self._buffer) < n:
            self._buffer = self.sample(n * self.refresh_every, generator, device)
        codes, self._buffer = self._buffer[:n], self._buffer[n:]
        return codes

    def distribution(self, n: int, device: torch.device) -> Distribution:
        raise no_density("model")

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": None if self._buffer is None else self._buffer.cpu()}

    def load_state_dict(self, state: dict[str, Any] | None, device: torch.device) -> None:
        buffer = (state or {}).get("buffer")
        self._buffer = None if buffer is None else buffer.to(device)


class ShardPrior:
    """pi(z) := the codes of a latent shard set, streamed."""

    has_density = False

    def __init__(self, cfg: PriorConfig, stream: StreamSpec | None) -> None:
        from symeq_dist.priors.trainer import code_schema

        self.shards = Path(cfg.shards)
        self.shape, self.family = code_schema(self.shards)
        self.split = cfg.split
        self.source = f"latent shards {self.shards} (split {cfg.split})"
        manifest = load_manifest(self.shards)
        if cfg.split not in manifest["splits"]:
            raise ConfigError(f"prior.split: {self.shards} has no split {cfg.split!r} (it has "
                              f"{sorted(manifest['splits'])})")
        self._stream = None if stream is None else open_train_stream(
            self.shards, manifest, cfg, seed=stream.seed + _STREAM_SEED, rank=stream.rank,
            world_size=stream.world_size, batch_size=stream.batch_size)
        self._pool: Tensor | None = None

    def next_codes(self, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
        if self._stream is None:
            raise RuntimeError("this ShardPrior was built without a stream (evaluation); it only samples")
        codes = next(self._stream)["code"]
        if len(codes) != n:
            raise RuntimeError(f"the prior stream serves {len(codes)} codes per round, the game asked for {n}")
        return codes.to(device, non_blocking=True)

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
        if self._pool is None:
            from symeq_dist.priors.trainer import first_codes

            self._pool = first_codes(self.shards, self.split, POOL)
        pool = self._pool.to(device)
        return pool[torch.randint(len(pool), (n,), generator=generator, device=device)]

    def distribution(self, n: int, device: torch.device) -> Distribution:
        raise no_density("shards")

    def state_dict(self) -> dict[str, Any] | None:
        return None if self._stream is None else self._stream.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None, device: torch.device) -> None:
        if state is not None and self._stream is not None:
            self._stream.load_state_dict(state)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()


class MaskPrior:
    """pi(s) := label maps of a shard set (`prior.kind=masks`, METHOD §7.6), one-hot (K, H, W), drawn with replacement
    with the caller's generator (the game: the rank's dream generator, whose state the checkpoint keeps, so a
    resume draws the same maps and this prior has no state of its own)."""

    has_density = False
    family = "categorical"

    def __init__(self, cfg: PriorConfig) -> None:
        from symeq_dist.data.labelled import label_map_pool

        _, self._maps, num_classes = label_map_pool(cfg.shards, cfg.split, cfg.mask_fraction)
        self.shape = (num_classes, *self._maps.shape[1:])
        self.source = (f"{len(self._maps)} label maps of {cfg.shards} (split {cfg.split}, fraction "
                       f"{cfg.mask_fraction:g})")

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
        rows = torch.randint(len(self._maps), (n,), generator=generator, device=generator.device)
        maps = self._maps[rows.cpu()].to(device, non_blocking=True)
        return torch.nn.functional.one_hot(maps, self.shape[0]).movedim(-1, 1).float()

    next_codes = sample

    def distribution(self, n: int, device: torch.device) -> Distribution:
        raise no_density("masks")
