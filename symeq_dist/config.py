"""The run configuration: a frozen dataclass tree, loaded from YAML plus dotted command-line overrides.

Precedence: dataclass defaults -> YAML file -> `a.b=value` overrides. Unknown keys and invalid values
raise `ConfigError` naming the key and the fix. Must not import torch.distributed or deepspeed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and the fix."""


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    kind: Literal["mlp", "ladder", "reverse"] = "mlp"
    """`mlp`: single-latent MLP VAE (fast); `ladder`/`reverse`: the reference two-layer Bernoulli HVAE."""
    image_shape: tuple[int, int, int] = (1, 28, 28)
    """(channels, height, width) of x."""
    x_dist: Literal["bernoulli", "gaussian"] = "bernoulli"
    """p(x|z): Bernoulli logits (binarised data) or Gaussian mean with a learned log sigma."""
    sigma: Literal["global", "per_dim"] = "global"
    """Gaussian x only: one learned log sigma, or one per pixel."""
    latent: Literal["gaussian", "bernoulli"] = "gaussian"
    """mlp only: the latent family; the prior is N(0, I) or uniform bits accordingly."""
    num_latents: int = 16
    """mlp only: latent dimension."""
    hidden: int = 512
    """mlp only: width of the two hidden layers of each player."""
    num_z0: int = 30
    """Hierarchical only: bits in the top latent z0 (prior Bern(1/2))."""
    num_z1: int = 100
    """Hierarchical only: bits in z1."""
    trunk_width: int = 600
    """Hierarchical only: encoder conv-trunk output width M (600 MNIST, 1000 Fashion-MNIST)."""
    mlp_width: int = 600
    """Hierarchical only: width of the fully connected nets (g_theta, heads)."""

    def __post_init__(self) -> None:
        for name in ("num_latents", "hidden", "num_z0", "num_z1", "trunk_width", "mlp_width"):
            _check(getattr(self, name) > 0, f"model.{name}", "must be a positive integer")
        _check(all(s > 0 for s in self.image_shape), "model.image_shape", "must be three positive ints")
        if self.kind != "mlp":
            _check(self.image_shape == (1, 28, 28), "model.image_shape",
                   f"the reference {self.kind} HVAE is built for (1, 28, 28) images; use model.kind=mlp")
        if self.kind == "reverse":
            _check(self.x_dist == "bernoulli", "model.x_dist",
                   "the reverse HVAE of the reference code has Bernoulli x; use kind=ladder for Gaussian x")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    shards: str = "data_shards/mnist"
    """Directory with `manifest.json` and the tar shards (written by `symeq shards mnist`)."""
    split: str = "train"
    """Split used for training."""
    eval_split: str = "valid"
    """Held-out split used for the data and reconstruction grids."""
    binarize_threshold: int | None = 112
    """Pixels with uint8 value >= threshold become 1 (112 == x > 0.4375); null keeps grey values / 255."""
    noise: Literal["flip", "gaussian", "none"] = "flip"
    """Training noise, fresh each iteration: pixel flips (binary data) or additive Gaussian."""
    noise_level: float = 0.001
    """Flip probability (flip) or standard deviation (gaussian)."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 reads in the training process)."""
    shuffle_buffer: int = 1000
    """Window of the epoch order within which samples are shuffled (after the shard/block permutation)."""
    bad_samples: Literal["fail", "skip"] = "fail"
    """A corrupt or missing sample: fail (error naming shard and key) or skip (dropped, counted in data/skipped)."""

    def __post_init__(self) -> None:
        if self.binarize_threshold is not None:
            _check(0 < self.binarize_threshold <= 255, "data.binarize_threshold", "must be in 1..255 or null")
        _check(self.noise_level >= 0, "data.noise_level", "must be >= 0")
        if self.noise == "flip":
            _check(self.noise_level <= 0.5, "data.noise_level", "a flip probability must be <= 0.5")
            _check(self.binarize_threshold is not None, "data.noise",
                   "flip noise needs binary data: set data.binarize_threshold or use data.noise=gaussian")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class GameConfig:
    kind: Literal["symmetric", "elbo"] = "symmetric"
    """`symmetric`: the two-player game (two engines); `elbo`: the ELBO baseline (one joint engine)."""
    schedule: Literal["alternating", "simultaneous"] = "alternating"
    """alternating: decoder step, then encoder step on samples of the updated decoder (reference order)."""
    nonfinite: Literal["skip", "fail"] = "skip"
    """On a non-finite loss on any rank: skip both players' updates (counted), or stop with an error."""
    max_consecutive_skips: int = 10
    """With nonfinite=skip: stop with an error after this many skipped steps in a row."""
    grad_spike: float = 0.0
    """Also skip (like a non-finite loss) an update whose gradient norm on any rank exceeds grad_spike x the
    running mean of that player's accepted norms on that rank; 0 = off. Needs ZeRO stage <= 2."""
    grad_spike_warmup: int = 20
    """Accepted steps before the spike check starts (the running mean needs a history)."""

    def __post_init__(self) -> None:
        _check(self.max_consecutive_skips >= 1, "game.max_consecutive_skips", "must be >= 1")
        _check(self.grad_spike == 0 or self.grad_spike > 1, "game.grad_spike", "must be 0 (off) or > 1")
        _check(self.grad_spike_warmup >= 1, "game.grad_spike_warmup", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    lr: float = 1e-4
    """Adam learning rate (plain Adam, not AdamW)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    zero_stage: int | None = None
    """Override of ds_config.json's ZeRO stage for this player (0-3); null keeps the shared value."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "engines.*.lr", f"must be > 0, got {self.lr}")
        _check(all(0 <= b < 1 for b in self.betas), "engines.*.betas", "both must be in [0, 1)")
        _check(self.eps > 0, "engines.*.eps", "must be > 0")
        _check(self.weight_decay >= 0, "engines.*.weight_decay", "must be >= 0")
        _check(self.zero_stage in (None, 0, 1, 2, 3), "engines.*.zero_stage", "must be 0, 1, 2, 3 or null")


@dataclass(frozen=True, kw_only=True)
class EnginesConfig:
    ds_config: str = "ds_config.json"
    """Shared DeepSpeed settings (precision, ZeRO stage, gradient clipping); no lr, no batch sizes."""
    encoder: EngineConfig = field(default_factory=EngineConfig)
    decoder: EngineConfig = field(default_factory=EngineConfig)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 1000
    """Iterations; one iteration = one optimiser step per player."""
    batch_size: int = 128
    """GLOBAL batch for both the data batch and the dreamed batch; split over ranks x accumulation."""
    grad_accumulation: int = 1
    """Micro-batches per optimiser step."""

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "train.steps", "must be >= 0")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.grad_accumulation >= 1, "train.grad_accumulation", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class MonitorConfig:
    log_every: int = 50
    """Scalars to TensorBoard every this many steps (one stacked all-reduce)."""
    image_every: int = 500
    """Image grids every this many steps (and at the last step)."""
    mi_ema: float = 0.99
    """EMA factor of the mutual-information monitors, per iteration (METHOD.md §13.3)."""
    mi_every: int = 10
    """Measure MI on every this-many-th iteration's batches (the EMA factor is adjusted to mi_ema**mi_every
    per measurement, so the monitor averages over the same ~1/(1-mi_ema) iterations); 1 = every step."""
    num_grid: int = 64
    """Images per grid."""
    progress: bool = True
    """tqdm progress bar on rank 0."""

    def __post_init__(self) -> None:
        _check(self.log_every >= 1, "monitor.log_every", "must be >= 1")
        _check(self.image_every >= 1, "monitor.image_every", "must be >= 1")
        _check(0 <= self.mi_ema < 1, "monitor.mi_ema", "must be in [0, 1)")
        _check(self.mi_every >= 1, "monitor.mi_every", "must be >= 1")
        _check(self.num_grid >= 1, "monitor.num_grid", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every: int = 500
    """Checkpoint every this many steps (and at the end)."""
    keep_last: int = 3
    """Older checkpoints are deleted."""

    def __post_init__(self) -> None:
        _check(self.every >= 1, "checkpoint.every", "must be >= 1")
        _check(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class FaultConfig:
    collective_timeout_s: float = 600.0
    """A collective that waits longer than this (a rank died or hangs) fails the run with an error."""
    preempt_signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM")
    """On these signals every rank finishes its step, a checkpoint is written and the run exits with 75
    (EX_TEMPFAIL), which the sbatch scripts turn into a requeue. Empty: default signal behaviour."""

    def __post_init__(self) -> None:
        _check(self.collective_timeout_s > 0, "fault.collective_timeout_s", "must be > 0")
        known = {"SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP", "SIGCONT", "SIGXCPU"}
        bad = [s for s in self.preempt_signals if s not in known]
        _check(not bad, "fault.preempt_signals", f"unknown {bad}; choose from {sorted(known)}")


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    num_chains: int = 16
    """Persistent monitoring chains (global; the reference code uses 10), one step per training iteration."""
    chain_init: Literal["random_code", "noise", "data"] = "random_code"
    """Start of the chains: a full decoder sample, uniform noise, or held-out data."""
    chain_every: int = 1
    """Advance the persistent chain every this many iterations (1 = reference; 0 = frozen, monitoring off)."""

    def __post_init__(self) -> None:
        _check(self.num_chains >= 1, "sampling.num_chains", "must be >= 1")
        _check(self.chain_every >= 0, "sampling.chain_every", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    run_dir: str = "runs/default"
    """Everything of the run lives here: config.yaml, tb/, checkpoints/, samples/."""
    seed: int = 0
    """The one seed; rank, worker and purpose streams derive from it."""
    resume: bool = False
    """Continue from <run_dir>/checkpoints/latest (error if there is none)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    game: GameConfig = field(default_factory=GameConfig)
    engines: EnginesConfig = field(default_factory=EnginesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        if self.model.kind != "mlp":
            _check(self.data.binarize_threshold is not None or self.model.x_dist == "gaussian", "model.x_dist",
                   "grey-valued data (data.binarize_threshold=null) needs model.x_dist=gaussian")

    def micro_batch_size(self, world_size: int) -> int:
        """Per-rank micro batch; raises if the global batch does not split evenly."""
        denom = world_size * self.train.grad_accumulation
        if self.train.batch_size % denom:
            raise ConfigError(f"train.batch_size: {self.train.batch_size} is not divisible by world size "
                              f"{world_size} x train.grad_accumulation {self.train.grad_accumulation}; "
                              f"choose a multiple of {denom}")
        return self.train.batch_size // denom

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- loading and coercion

def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        _check(value in typing.get_args(tp), key,
               f"invalid value {value!r}; choose one of {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            _check(type(None) in args, key, "may not be null")
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple and typing.get_args(tp)[-1] is Ellipsis:  # tuple[X, ...]: any length
        _check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        return tuple(_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        args = typing.get_args(tp)
        _check(isinstance(value, (list, tuple)) and len(value) == len(args), key,
               f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r}")  # internal: a field type we forgot


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{(prefix + '.') if prefix else ''}{close[0]}'? " if close else ""
            raise ConfigError(f"{full}: unknown key; {hint}valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if prefix and "*" in str(err):  # EngineConfig does not know which player it is
            raise ConfigError(str(err).replace("engines.*", prefix)) from None
        raise


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ["train.steps=200", "engines.decoder.lr=2e-4"] into a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.steps=200")
        _set_dotted(tree, key.strip().lstrip("-"), yaml.safe_load(raw) if raw else "")
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config: defaults, then the YAML file, then dotted overrides.

    Raises:
        FileNotFoundError: the YAML file does not exist.
        ConfigError: unknown key or invalid value (the message names the key and the fix).
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found; the shipped configs are in configs/")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, train:, ...)")
        data = loaded
    data = _merge(data, parse_overrides(overrides or []))
    return _build(RunConfig, data, "")


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from `to_dict()` output (e.g. a checkpoint's stored config)."""
    return _build(RunConfig, data, "")


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
