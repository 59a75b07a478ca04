"""The game and its guards: which utilities, in which update order, and what a bad step does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from symeq_dist.config.base import check


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
    running mean of that player's accepted norms on that rank; 0 = off. Needs ZeRO stage <= 2. Units: a ratio
    (dimensionless). The norm is the L2 norm over all of the player's parameters of the rank's own gradient,
    before the ranks average it (in the loss's units: nats per sample, since losses are per-sample means), and
    the running mean is the mean of the first grad_spike_warmup accepted norms, then an EMA with rate 0.02; it
    is logged as sys/grad_norm/<player>. So the threshold is relative and needs no rescaling when a deep model's
    norms are large: 10-100 catches blow-ups, values near 1 would skip ordinary noise. Every skip counts
    towards game.max_consecutive_skips, which stops the run with an error instead of looping on skips (the
    failure VDVAE users report: an absolute threshold that every update exceeds)."""
    grad_spike_warmup: int = 20
    """Accepted steps before the spike check starts (the running mean needs a history)."""

    def __post_init__(self) -> None:
        check(self.max_consecutive_skips >= 1, "game.max_consecutive_skips", "must be >= 1")
        check(self.grad_spike == 0 or self.grad_spike > 1, "game.grad_spike", "must be 0 (off) or > 1")
        check(self.grad_spike_warmup >= 1, "game.grad_spike_warmup", "must be >= 1")
