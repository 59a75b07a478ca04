"""The latent source pi(z) of the decoder's top latent (METHOD §1, §7.5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from symeq_dist.config.base import check

IMPLICIT_PRIORS = ("model", "shards", "masks")


@dataclass(frozen=True, kw_only=True)
class PriorConfig:
    kind: Literal["auto", "standard_gaussian", "uniform_bits", "uniform_classes", "model", "shards", "masks"] = "auto"
    """auto: the closed form matching the decoder's top latent (N(0, I) for a Gaussian top, uniform bits
    for a Bernoulli top, uniform classes for a class latent); standard_gaussian / uniform_bits /
    uniform_classes: that closed form, checked against the top
    latent. Implicit priors, only sampled (the ELBO game refuses them: it needs log pi(z)): model = a frozen
    `symeq prior train` run (`prior.run`), sampled on every rank with the rank's dream generator; shards =
    latent shards (`symeq prior codes` / `symeq prior sample`, `prior.shards`) streamed and split over the
    ranks like the data, resumed exactly; masks = label maps of a shard set (`prior.shards`, default data.shards),
    drawn with replacement: pi(s) of the image + segmentation model (`model.kind: seg_hvae`)."""
    run: str = ""
    """prior.kind=model: the prior run directory (its latest checkpoint; the averaged weights when it keeps them)."""
    shards: str = ""
    """prior.kind=shards: a latent shard set (manifest.json with a `code` entry). prior.kind=masks: a shard set with
    label maps (empty: data.shards)."""
    mask_fraction: float = -1.0
    """prior.kind=masks: the label maps of this fraction of the split (the same fixed priority order as
    data.labelled_fraction, so equal fractions give the labelled pool's masks; 1 = every mask of the split, used as
    unpaired samples); -1: data.labelled_fraction when it is set, else 1."""
    split: str = "train"
    """prior.kind=shards: the split of the latent shard set that is streamed."""
    shuffle_buffer: int = 1000
    """prior.kind=shards: window of the code order within which codes are shuffled (as data.shuffle_buffer)."""
    refresh_every: int = 1
    """prior.kind=model: draw the codes of this many steps at once and serve them from a buffer (a diffusion
    prior's sampling passes then run once per k steps, in batches k times larger). The buffer is part of each
    rank's checkpoint, so resume is exact at the same number of ranks; on another number it is dropped and
    refilled. 1 = a fresh draw every step."""

    sample_steps: int = 0
    """prior.kind=model with a diffusion prior: its DDIM steps per draw instead of the prior run's own
    `model.sample_steps` (fewer are cheaper and coarser: docs/priors.md measures both); 0 = the run's own."""

    def __post_init__(self) -> None:
        check(bool(self.run) == (self.kind == "model"), "prior.run",
              "set it (a `symeq prior train` run directory) with prior.kind=model, and only then")
        check(bool(self.shards) == (self.kind == "shards") or self.kind == "masks", "prior.shards",
              "set it (a latent shard set from `symeq prior codes` or `symeq prior sample`) with prior.kind=shards, "
              "and only then (or with prior.kind=masks: a shard set with label maps)")
        check(self.mask_fraction == -1.0 or 0.0 < self.mask_fraction <= 1.0, "prior.mask_fraction",
              "must be in (0, 1], or -1 (data.labelled_fraction)")
        check(self.mask_fraction == -1.0 or self.kind == "masks", "prior.mask_fraction",
              "applies to prior.kind=masks only")
        check(self.refresh_every >= 1, "prior.refresh_every", "must be >= 1")
        check(self.refresh_every == 1 or self.kind == "model", "prior.refresh_every",
              "buffers only prior.kind=model draws; leave it at 1")
        check(self.shuffle_buffer >= 1, "prior.shuffle_buffer", "must be >= 1")
        check(self.sample_steps >= 0, "prior.sample_steps", "must be >= 0 (0 = the prior run's own)")
        check(self.sample_steps == 0 or self.kind == "model", "prior.sample_steps", "applies to prior.kind=model only")

    # the stream (symeq_dist.data.stream) reads these names from its config
    @property
    def num_workers(self) -> int:
        return 0

    @property
    def bad_samples(self) -> str:
        return "fail"
