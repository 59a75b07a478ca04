"""The loop's lengths and intervals: training, monitoring, checkpoints, faults, monitoring chains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from symeq_dist.config.base import check


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 1000
    """Iterations; one iteration = one optimiser step per player."""
    batch_size: int = 128
    """GLOBAL batch for both the data batch and the dreamed batch; split over ranks x accumulation."""
    grad_accumulation: int = 1
    """Micro-batches per optimiser step."""
    ema_decay: float = 0.0
    """Keep exponential moving averages of both players' weights with this decay per applied update (e.g.
    0.999), for `symeq sample` and `symeq eval` (which use them when present); 0 = off. Stored in every
    checkpoint's weights.pt; resumes exactly (runtime/ema.py: at ZeRO-3 each rank averages its partition)."""
    init_from: str = ""
    """A run directory whose latest checkpoint's trained weights (not the averages) both players start from, e.g.
    an ELBO run before the symmetric game; optimisers, step, data order and RNG start fresh, and the model keys
    must match. Ignored when resuming (the run's own checkpoint is loaded). Empty = the seeded initialisation."""
    channels_last: bool = False
    """Keep both players' conv weights and the image batches in channels-last (NHWC) memory order, which oneDNN's
    CPU convolutions and cuDNN's tensor-core kernels prefer; values are unchanged. Weights only at ZeRO-0
    (runtime/engines.py says why). Measured with bf16 autocast in docs/benchmarks.md ("Training speed")."""

    def __post_init__(self) -> None:
        check(self.steps >= 0, "train.steps", "must be >= 0")
        check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        check(self.grad_accumulation >= 1, "train.grad_accumulation", "must be >= 1")
        check(0.0 <= self.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1) (0 = off)")


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
        check(self.log_every >= 1, "monitor.log_every", "must be >= 1")
        check(self.image_every >= 1, "monitor.image_every", "must be >= 1")
        check(0 <= self.mi_ema < 1, "monitor.mi_ema", "must be in [0, 1)")
        check(self.mi_every >= 1, "monitor.mi_every", "must be >= 1")
        check(self.num_grid >= 1, "monitor.num_grid", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every: int = 500
    """Checkpoint every this many steps (and at the end)."""
    keep_last: int = 3
    """Older checkpoints are deleted."""

    def __post_init__(self) -> None:
        check(self.every >= 1, "checkpoint.every", "must be >= 1")
        check(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class FaultConfig:
    collective_timeout_s: float = 600.0
    """A collective that waits longer than this (a rank died or hangs) fails the run with an error."""
    preempt_signals: tuple[str, ...] = ("SIGUSR1", "SIGUSR2", "SIGTERM")
    """On these signals every rank finishes its step, a checkpoint is written and the run exits with 75
    (EX_TEMPFAIL), which the sbatch scripts turn into a requeue. Empty: default signal behaviour."""

    def __post_init__(self) -> None:
        check(self.collective_timeout_s > 0, "fault.collective_timeout_s", "must be > 0")
        known = {"SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP", "SIGCONT", "SIGXCPU"}
        bad = [s for s in self.preempt_signals if s not in known]
        check(not bad, "fault.preempt_signals", f"unknown {bad}; choose from {sorted(known)}")


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    num_chains: int = 16
    """Persistent monitoring chains (global; the reference code uses 10), one step per training iteration."""
    chain_init: Literal["random_code", "noise", "data"] = "random_code"
    """Start of the chains: a full decoder sample, uniform noise, or held-out data."""
    chain_every: int = 1
    """Advance the persistent chain every this many iterations (1 = reference; 0 = frozen, monitoring off)."""

    def __post_init__(self) -> None:
        check(self.num_chains >= 1, "sampling.num_chains", "must be >= 1")
        check(self.chain_every >= 0, "sampling.chain_every", "must be >= 0")
