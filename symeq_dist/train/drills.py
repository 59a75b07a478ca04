"""Fault drills: `SYMEQ_FAULT="kind:step:rank[,...]"` injects a fault for drills and tests.

Kinds: `nan` (that rank's first loss of the step becomes NaN), `spike` (it is multiplied by 1e4), `hang` (the
rank sleeps forever before the step), `kill` (the rank SIGKILLs itself before the step), `usr1` (the rank
sends itself SIGUSR1 before the step, as if only that rank had been preempted). The entry point parses the
variable (`FaultPlan.parse`); the trainer asks the plan. Must not import models or data.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

from torch import Tensor

from symeq_dist.errors import InputError

log = logging.getLogger(__name__)

FAULT_ENV = "SYMEQ_FAULT"
FAULT_KINDS = ("nan", "spike", "hang", "kill", "usr1")


@dataclass(frozen=True)
class FaultPlan:
    """Faults to inject: (kind, step, rank) triples parsed from SYMEQ_FAULT."""

    faults: tuple[tuple[str, int, int], ...] = ()

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """The plan of a SYMEQ_FAULT value ("" = no faults)."""
        text = text.strip()
        if not text:
            return cls()
        faults = []
        for item in text.split(","):
            parts = item.strip().split(":")
            if len(parts) != 3 or parts[0] not in FAULT_KINDS or not parts[1].isdigit() or not parts[2].isdigit():
                raise InputError(f"{FAULT_ENV}={text!r}: each fault is kind:step:rank with kind one of "
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

    def first_loss(self, loss: Tensor, step: int, rank: int) -> Tensor:
        """The first loss of a step (the decoder's, or the joint ELBO loss), with a nan/spike fault applied."""
        if self.has("nan", step, rank):
            log.warning("fault drill: NaN loss on rank %d at step %d", rank, step)
            return loss * float("nan")
        if self.has("spike", step, rank):
            log.warning("fault drill: loss x 1e4 on rank %d at step %d", rank, step)
            return loss * 1e4
        return loss
