"""Family `seg_hvae`: the image + segmentation model (METHOD §7.6; the paper's Fig. 3 and 4), built on `hvae`.

Decoder (theta): the top latent s ~ pi(s), a per-pixel label map (one-hot (K, H, W), drawn from masks:
`prior.kind=masks`); every latent group of the hierarchical VAE gets a prior head p(z_l | z_<l, s), and
p(x | s, z) is the hvae's image head. s enters the top-down state through a mask pyramid: a 3x3 conv of the
one-hot map at full resolution, average-pooled to every stage's resolution and projected to its width, added to h
where the stage begins. z0 (1 x 1) is the global style code, the finer groups the local detail.

Encoder (phi): the hvae's bottom-up features e_r(x), a segmentation head q(s | x) on them (every resolution
projected to `model.seg_width`, upsampled bilinearly and summed, two 3x3 convs to per-pixel logits: a feature
pyramid), then q(z_l | x, s, z_<l) = post_l(concat(e_r(x), h_l)) ladder style, where the decoder's state h_l
already holds s. `Encoder.sample(..., observed={"s": one-hot, "s_mask": m})` keeps the given map on the rows with
m = 1 (a labelled image) and draws s ~ q(s | x) on the others (drawn for every row, so a row with m = 0 is exactly
an unlabelled one), then the groups given that s.

In the paper's notation: p(x | s, z2) is this decoder's p(x | s, z); the role of its p(s | x, z) (a map given an
image) is taken by q(s | x), which the symmetric game trains on the decoder's dreams (x, s) and on the labelled
images. Detaching rule: as hvae (the encoder reads the decoder's states under no_grad in its step; the decoder
is teacher-forced on the encoder's samples, s included). Pure torch: must not import `runtime`, deepspeed or I/O.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symeq_dist.config import SegHVAEConfig
from symeq_dist.models.distributions import Distribution, OneHotCategorical
from symeq_dist.models.families.hvae import HVAEDecoder, HVAEEncoder
from symeq_dist.models.players import Decoder, Latents, Players, Sample


class SegHVAEDecoder(HVAEDecoder):
    """pi(s) prod_l p(z_l | z_<l, s) p(x | s, z); latents ("s", "z0", "z1", ...)."""

    conditioned = True

    def __init__(self, cfg: SegHVAEConfig) -> None:
        super().__init__(cfg)
        self.latent_names = ("s", *self.group_names)
        self.latent_shapes = {"s": (cfg.num_classes, *cfg.image_shape[1:]), **self.latent_shapes}
        self.top_family = "categorical"
        full = cfg.stages[-1].width
        self.mask_stem = nn.Conv2d(cfg.num_classes, full, 3, padding=1)
        self.mask_proj = nn.ModuleList(nn.Conv2d(full, stage.width, 1) for stage in cfg.stages)

    def _context(self, z: Latents) -> list[Tensor]:
        e = F.gelu(self.mask_stem(z["s"]))  # (B, width, H, W)
        return [proj(F.adaptive_avg_pool2d(e, stage.resolution))
                for proj, stage in zip(self.mask_proj, self.cfg.stages, strict=True)]


class SegHVAEEncoder(HVAEEncoder):
    """q(s | x) from the feature pyramid, then the hvae's ladder posteriors given s (module docstring)."""

    OPS = (*HVAEEncoder.OPS, "segment")

    def __init__(self, cfg: SegHVAEConfig) -> None:
        super().__init__(cfg)
        self.analytic_kl = False
        self.seg_proj = nn.ModuleList(nn.Conv2d(stage.width, cfg.seg_width, 1) for stage in cfg.stages)
        self.seg_out = nn.Sequential(nn.GELU(), nn.Conv2d(cfg.seg_width, cfg.seg_width, 3, padding=1), nn.GELU(),
                                     nn.Conv2d(cfg.seg_width, cfg.num_classes, 3, padding=1))

    def segment(self, x: Tensor) -> OneHotCategorical:
        """q(s | x): per-pixel class logits (B, K, H, W) as a distribution over one-hot maps."""
        return self.call("segment", x)

    def _q_s(self, features: dict[int, Tensor]) -> OneHotCategorical:
        size = self.cfg.image_shape[1:]
        pyramid = sum(F.interpolate(proj(features[stage.resolution]), size=size, mode="bilinear", align_corners=False)
                      for proj, stage in zip(self.seg_proj, self.cfg.stages, strict=True))
        return OneHotCategorical(self.seg_out(pyramid))

    def _segment(self, x: Tensor) -> OneHotCategorical:
        return self._q_s(self._features(x))

    def _sample(self, x: Tensor, decoder: Decoder, generator: torch.Generator | None = None,
                reparam: bool = False, observed: Latents | None = None) -> Sample:
        if reparam:
            raise NotImplementedError("seg_hvae: a label map has no reparametrised sample (the ELBO is not built)")
        features = self._features(x)
        q_s = self._q_s(features)
        s = q_s.sample(generator)
        if observed is not None and "s" in observed:  # labelled rows keep their map
            mask = observed["s_mask"].to(s.dtype).view(-1, 1, 1, 1)
            s = mask * observed["s"].to(s.dtype) + (1 - mask) * s
        z, q = self._sample_groups(features, decoder, {"s": s}, generator, reparam)
        return z, {"s": q_s, **q}

    def _conditionals(self, x: Tensor, z: Latents, decoder: Decoder) -> dict[str, Distribution]:
        features = self._features(x)
        return {"s": self._q_s(features), **self._group_conditionals(features, z, decoder)}


def build_players(cfg: SegHVAEConfig) -> Players:
    return Players(encoder=SegHVAEEncoder(cfg), decoder=SegHVAEDecoder(cfg))
