"""Fault tolerance pieces the trainer composes: preemption signals, the gradient-spike guard, fault drills.

- `PreemptWatcher`: the signals in `fault.preempt_signals` (SLURM's `--signal=USR1@T` before the time
  limit, SIGTERM on preemption) only set a flag; at the end of every step the ranks agree (one tiny
  all-reduce) whether any rank was signalled, and then all of them checkpoint and exit with
  EXIT_REQUEUE = 75 (the sbatch scripts requeue on it). A signal never interrupts a collective.
- `GradGuard`: the local gradient norm of each player's backward on each rank (tensor hooks, so it is
  the rank's own gradient before DeepSpeed reduces it). An update is bad when that norm is not finite or
  exceeds `game.grad_spike` x the running mean of the accepted norms; ranks agree, and a bad update is
  discarded everywhere before any engine steps it.
- `FaultPlan`: `SYMEQ_FAULT="kind:step:rank[,...]"` injects a fault for drills and tests: `nan` (that
  rank's decoder loss becomes NaN), `spike` (its decoder loss x 1e4), `hang` (the rank sleeps forever
  before the step), `kill` (the rank SIGKILLs itself before the step), `usr1` (the rank sends itself
  SIGUSR1 before the step, as if only that rank had been preempted).
Must not import models or data.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from symeq_dist.dist import DistInfo, all_reduce

log = logging.getLogger(__name__)

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "checkpointed, run me again"
FAULT_ENV = "SYMEQ_FAULT"
FAULT_KINDS = ("nan", "spike", "hang", "kill", "usr1")


class Preempted(Exception):
    """Raised after the collective checkpoint that a preemption signal asked for."""

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(f"{signal_name} received: checkpoint at step {step} written; exiting with "
                         f"{EXIT_REQUEUE} so the job is requeued and resumes there")
        self.step, self.signal_name = step, signal_name


def agree_any(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is true on any rank (one tiny all-reduce)."""
    if info.world_size == 1:
        return flag
    return bool(all_reduce(torch.tensor([float(flag)], device=info.device), info, op="max").item())


class PreemptWatcher:
    """Installs the handlers on enter, restores the previous ones on exit; `signalled` names the signal."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = tuple(names)
        self.signalled: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signalled is None:
            log.warning("%s received: finishing this step, then a checkpoint and exit %d", name, EXIT_REQUEUE)
        self.signalled = name

    def __enter__(self) -> PreemptWatcher:
        for name in self.names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


@dataclass(frozen=True)
class FaultPlan:
    """Faults to inject: (kind, step, rank) triples parsed from SYMEQ_FAULT."""

    faults: tuple[tuple[str, int, int], ...] = ()

    @classmethod
    def from_env(cls) -> FaultPlan:
        text = os.environ.get(FAULT_ENV, "").strip()
        if not text:
            return cls()
        faults = []
        for item in text.split(","):
            parts = item.strip().split(":")
            if len(parts) != 3 or parts[0] not in FAULT_KINDS or not parts[1].isdigit() or not parts[2].isdigit():
                raise ValueError(f"{FAULT_ENV}={text!r}: each fault is kind:step:rank with kind one of "
                                 f"{', '.join(FAULT_KINDS)}, e.g. nan:3:1")
            faults.append((parts[0], int(parts[1]), int(parts[2])))
        log.warning("fault drill armed: %s", text)
        return cls(tuple(faults))

    def has(self, kind: str, step: int, rank: int) -> bool:
        return (kind, step, rank) in self.faults

    def before_step(self, step: int, rank: int) -> None:
        """Steps count from 1 (the step being taken)."""
        if self.has("kill", step, rank):
            log.warning("fault drill: rank %d kills itself before step %d", rank, step)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.has("usr1", step, rank):
            log.warning("fault drill: rank %d sends itself SIGUSR1 before step %d", rank, step)
            os.kill(os.getpid(), signal.SIGUSR1)
        if self.has("hang", step, rank):
            log.warning("fault drill: rank %d hangs before step %d", rank, step)
            while True:
                time.sleep(3600)

    def decoder_loss(self, loss: Tensor, step: int, rank: int) -> Tensor:
        if self.has("nan", step, rank):
            log.warning("fault drill: NaN decoder loss on rank %d at step %d", rank, step)
            return loss * float("nan")
        if self.has("spike", step, rank):
            log.warning("fault drill: decoder loss x 1e4 on rank %d at step %d", rank, step)
            return loss * 1e4
        return loss


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
        """The local gradient norm of `name`'s last backward (resets the accumulator)."""
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


PREEMPTED_FILE = "PREEMPTED"  # <run_dir>/PREEMPTED: "checkpointed on a signal at step N" (the sbatch script reads it)


def mark_preempted(run_dir: str | os.PathLike, step: int) -> None:
    """Record (atomically) that the run checkpointed on a preemption signal; the launcher removes it at start."""
    path = os.path.join(run_dir, PREEMPTED_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(f"{step}\n")
    os.replace(path + ".tmp", path)
