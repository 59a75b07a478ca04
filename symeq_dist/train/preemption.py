"""Preemption: signals only set a flag; at the end of a step the ranks agree, all checkpoint, and the run exits 75.

The signals in `fault.preempt_signals` (SLURM's `--signal=USR1@T` before the time limit, SIGTERM on
preemption) are handled by `PreemptWatcher`; the trainer asks the ranks (one tiny all-reduce) whether any
was signalled, and then all of them checkpoint and raise `Preempted`; `symeq train` exits with
EXIT_REQUEUE = 75 (the sbatch scripts requeue on it). A signal never interrupts a collective.
Must not import models or data.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "checkpointed, run me again"


class Preempted(Exception):
    """Raised after the collective checkpoint that a preemption signal asked for."""

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(f"{signal_name} received: checkpoint at step {step} written; exiting with "
                         f"{EXIT_REQUEUE} so the job is requeued and resumes there")
        self.step, self.signal_name = step, signal_name


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


PREEMPTED_FILE = "PREEMPTED"  # <run_dir>/PREEMPTED: "checkpointed on a signal at step N" (the sbatch script reads it)


def mark_preempted(run_dir: str | os.PathLike, step: int) -> None:
    """Record (atomically) that the run checkpointed on a preemption signal; the launcher removes it at start."""
    path = os.path.join(run_dir, PREEMPTED_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(f"{step}\n")
    os.replace(path + ".tmp", path)
