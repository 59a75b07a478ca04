"""The latent source pi(z) of the decoder's top latent (METHOD §1, §7.5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class PriorConfig:
    kind: Literal["auto", "standard_gaussian", "uniform_bits"] = "auto"
    """auto: the closed form matching the decoder's top latent (N(0, I) for a Gaussian top, uniform bits
    for a Bernoulli top); standard_gaussian / uniform_bits: that closed form, checked against the top
    latent. Implicit priors (samples of a separately trained model, latent shards) arrive with the
    prior kinds `model` and `shards`."""
