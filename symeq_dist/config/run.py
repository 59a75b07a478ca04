"""The whole run: one frozen tree of the per-concern sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from symeq_dist.config.base import ConfigError, check
from symeq_dist.config.data import DataConfig
from symeq_dist.config.engines import EnginesConfig
from symeq_dist.config.game import GameConfig
from symeq_dist.config.models import ClassMLPConfig, MLPVAEConfig, ModelConfig, Reference28Config, SegHVAEConfig
from symeq_dist.config.prior import IMPLICIT_PRIORS, PriorConfig
from symeq_dist.config.train import CheckpointConfig, FaultConfig, MonitorConfig, SamplingConfig, TrainConfig


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    run_dir: str = "runs/default"
    """Everything of the run lives here: config.yaml, tb/, checkpoints/, samples/."""
    seed: int = 0
    """The one seed; rank, worker and purpose streams derive from it."""
    resume: bool = False
    """Continue from <run_dir>/checkpoints/latest (error if there is none)."""
    model: ModelConfig = field(default_factory=MLPVAEConfig)
    """The players' networks; `model.kind` picks the family and with it the valid keys."""
    prior: PriorConfig = field(default_factory=PriorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    game: GameConfig = field(default_factory=GameConfig)
    engines: EnginesConfig = field(default_factory=EnginesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        seg = isinstance(self.model, SegHVAEConfig)
        attributes = isinstance(self.model, ClassMLPConfig) and self.model.label == "attributes"
        check(self.data.labelled_fraction == 0 or seg or attributes, "data.labelled_fraction",
              f"label maps or attribute vectors enter as observed values of a latent, which model.kind="
              f"{self.model.kind} has not; use model.kind=seg_hvae, or class_mlp with model.label=attributes, or "
              "data.labelled_fraction=0")
        check(not attributes or self.data.labels_per_class == 0, "data.labels_per_class",
              "attributes are labelled by fraction: set data.labelled_fraction instead (and labels_per_class=0)")
        check(not seg or self.game.kind == "symmetric", "game.kind",
              "elbo is not built for model.kind=seg_hvae: its label-map latent has no reparametrised sample and its "
              "prior pi(s) is known only through samples; use game.kind=symmetric")
        check(not seg or self.prior.kind == "masks", "prior.kind",
              "model.kind=seg_hvae draws its top latent s from label maps: set prior.kind=masks")
        check(self.prior.kind != "masks" or seg, "prior.kind",
              "masks feeds the label-map latent of model.kind=seg_hvae")
        check(self.game.kind != "elbo" or self.prior.kind not in IMPLICIT_PRIORS, "prior.kind",
              f"{self.prior.kind} is known only through samples, and the ELBO game needs the density log pi(z) for its "
              "KL term; use game.kind=symmetric (the game that needs only samples) or a closed-form prior "
              "(prior.kind=auto)")
        check(self.game.kind != "elbo" or not isinstance(self.model, ClassMLPConfig), "game.kind",
              "elbo is not built for model.kind=class_mlp: a class latent has no reparametrised sample (the "
              "semi-supervised ELBO sums over the classes instead); use game.kind=symmetric")
        check(self.data.labels_per_class == 0 or isinstance(self.model, ClassMLPConfig), "data.labels_per_class",
              f"labels enter as observed values of a class latent, which model.kind={self.model.kind} has not; use "
              "model.kind=class_mlp or data.labels_per_class=0")
        if self.prior.kind == "masks":  # resolved here, so the saved config names the exact masks
            fraction = self.prior.mask_fraction
            if fraction == -1.0:
                fraction = self.data.labelled_fraction or 1.0
            object.__setattr__(self, "prior", dataclasses.replace(
                self.prior, shards=self.prior.shards or self.data.shards, mask_fraction=fraction))
        if isinstance(self.model, Reference28Config):
            check(self.data.binarize_threshold is not None or self.model.x_dist == "gaussian", "model.x_dist",
                  "grey-valued data (data.binarize_threshold=null) needs model.x_dist=gaussian")

    def micro_batch_size(self, world_size: int) -> int:
        """Per-rank micro batch; raises if the global batch does not split evenly."""
        return self._per_micro_batch("train.batch_size", self.train.batch_size, world_size)

    def labelled_micro_batch_size(self, world_size: int) -> int:
        """Labelled rows per rank and micro-batch (semi-supervised runs); raises if they do not split evenly."""
        return self._per_micro_batch("data.labelled_batch_size", self.data.labelled_batch_size, world_size)

    def _per_micro_batch(self, key: str, total: int, world_size: int) -> int:
        denom = world_size * self.train.grad_accumulation
        if total % denom:
            raise ConfigError(f"{key}: {total} is not divisible by world size {world_size} x "
                              f"train.grad_accumulation {self.train.grad_accumulation}; choose a multiple of {denom}")
        return total // denom

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    return value
