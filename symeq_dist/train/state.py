"""What a rank carries from step to step besides the engines: counters and the per-purpose RNG streams.

Must not import models, data or runtime.engines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

PURPOSES = ("data", "wake", "dream", "chain", "grid")


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    grad_norms: dict[str, list[float]] = field(default_factory=dict)  # GradGuard: player -> [count, mean]


def make_generators(seed: int, rank: int, device: torch.device, step: int | None = None) -> dict[str, torch.Generator]:
    """One generator per (seed, rank, purpose): ranks draw different samples, a resume reproduces them.

    `step` is given after a resume on another number of ranks: fresh streams for (seed, rank, step).
    """
    gens = {}
    for i, purpose in enumerate(PURPOSES):
        gen = torch.Generator(device=device)
        entropy = [seed, rank, i] if step is None else [seed, rank, i, step]
        gen.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        gens[purpose] = gen
    return gens
