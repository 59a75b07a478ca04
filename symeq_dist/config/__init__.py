"""The run configuration: a frozen dataclass tree, one module per concern, loaded from YAML + dotted overrides.

Precedence: dataclass defaults -> YAML file -> `a.b=value` overrides (`loading.py`). Unknown keys and
invalid values raise `ConfigError` naming the key and the fix. Must not import torch.distributed or deepspeed.
"""

from symeq_dist.config.base import ConfigError
from symeq_dist.config.data import DataConfig
from symeq_dist.config.engines import EngineConfig, EnginesConfig
from symeq_dist.config.game import GameConfig
from symeq_dist.config.loading import config_from_dict, dump_config, load_config, parse_overrides, with_overrides
from symeq_dist.config.models import (
    MODEL_CONFIGS,
    ClassMLPConfig,
    HVAEConfig,
    Ladder28Config,
    MLPVAEConfig,
    ModelConfig,
    Reference28Config,
    Reverse28Config,
    SegHVAEConfig,
    StageConfig,
    model_config,
)
from symeq_dist.config.prior import IMPLICIT_PRIORS, PriorConfig
from symeq_dist.config.prior_run import PriorRunConfig
from symeq_dist.config.run import RunConfig
from symeq_dist.config.train import CheckpointConfig, FaultConfig, MonitorConfig, SamplingConfig, TrainConfig

__all__ = [
    "IMPLICIT_PRIORS", "MODEL_CONFIGS", "CheckpointConfig", "ClassMLPConfig", "ConfigError", "DataConfig",
    "EngineConfig", "EnginesConfig", "FaultConfig", "GameConfig", "HVAEConfig", "Ladder28Config", "MLPVAEConfig",
    "ModelConfig", "MonitorConfig", "PriorConfig", "PriorRunConfig", "Reference28Config", "Reverse28Config",
    "RunConfig", "SamplingConfig", "SegHVAEConfig", "StageConfig", "TrainConfig",
    "config_from_dict", "dump_config", "load_config", "model_config", "parse_overrides", "with_overrides",
]
