"""Family `hvae`: a deep multi-scale hierarchical VAE for large images (VDVAE-style top-down, ladder encoder).

Decoder (theta), top-down over stages of increasing resolution (config `model.stages`, low to high): a
learned constant state h at the lowest resolution; per latent group l at resolution r: the prior
p(z_l | z_<l) = head_l(h) (a bottleneck head; per-pixel Gaussian or Bernoulli, `latent_channels` x r x r), then
h <- cell_l(h + proj_l(z_l)) (a residual bottleneck cell); between stages h is upsampled (nearest) and
projected to the next width; finally p(x | z) = XHead(conv(h)). The first group is the top latent z0 ~ pi
(no parameters; the prior may be implicit). Encoder (phi): a bottom-up residual network e(x) with features at
every resolution, and per group a posterior head q(z_l | x, z_<l) = post_l(concat(e_r(x), h_l)), where h_l
is the decoder's state where z_l enters (ladder sharing, METHOD §7.2 generalised). Every Gaussian head's
mean and log sigma are soft-clamped and its sigma kept below `model.sigma_max` (why: docs/hvae.md, the scale
drift).

Detaching rule (tests/test_hvae.py checks it for every group): the encoder gets every h_l from ONE
`decoder.top_down` call per pass. In the encoder step (teacher-forced on dreams, `conditionals`) that call
runs under no_grad, so every h_l is a constant and the encoder loss trains phi only; while sampling (wake
pairs, chains) everything runs under no_grad; in the ELBO (reparam) h_l keeps its graph and theta gets
gradients through it. In the decoder step the decoder is teacher-forced on the encoder's samples (a leaf
tensor per group): no gradient reaches phi. Pure torch: must not import `runtime`, deepspeed or any I/O.
"""

from __future__ import annotations

import itertools
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from symeq_dist.config import HVAEConfig
from symeq_dist.models.distributions import Bernoulli, Distribution, Gaussian
from symeq_dist.models.layers import XHead, draw, unpack, x_head_channels, x_offset_shape
from symeq_dist.models.players import Decoder, Encoder, Latents, Players, Posterior, Sample, TopDown, pick


class Cell(nn.Module):
    """Residual bottleneck: x + conv1x1(GELU(conv3x3(GELU(conv3x3(GELU(conv1x1(GELU(x)))))))), width -> width.

    The last conv starts scaled by `out_scale` (1/sqrt(number of cells)), so a deep stack starts near the
    identity (VDVAE's initialisation). 3x3 convs become 1x1 at resolutions below 3.
    """

    def __init__(self, width: int, middle: int, resolution: int, out_scale: float) -> None:
        super().__init__()
        k = 3 if resolution >= 3 else 1
        self.c1 = nn.Conv2d(width, middle, 1)
        self.c2 = nn.Conv2d(middle, middle, k, padding=k // 2)
        self.c3 = nn.Conv2d(middle, middle, k, padding=k // 2)
        self.c4 = nn.Conv2d(middle, width, 1)
        with torch.no_grad():
            self.c4.weight.mul_(out_scale)

    def forward(self, x: Tensor) -> Tensor:  # (B, width, r, r) -> same
        h = self.c2(F.gelu(self.c1(F.gelu(x))))
        return x + self.c4(F.gelu(self.c3(F.gelu(h))))


class Head(nn.Module):
    """Bottleneck map to a latent group's parameters: conv1x1(in -> middle), GELU, conv3x3 (1x1 below 3x3
    maps), GELU, conv1x1(middle -> out): the prior p(z_l | h) and the posterior q(z_l | e, h) heads."""

    def __init__(self, channels_in: int, middle: int, channels_out: int, resolution: int) -> None:
        super().__init__()
        k = 3 if resolution >= 3 else 1
        self.net = nn.Sequential(nn.Conv2d(channels_in, middle, 1), nn.GELU(),
                                 nn.Conv2d(middle, middle, k, padding=k // 2), nn.GELU(),
                                 nn.Conv2d(middle, channels_out, 1))

    def forward(self, x: Tensor) -> Tensor:  # (B, channels_in, r, r) -> (B, channels_out, r, r)
        return self.net(x)


def _middle(width: int, cfg: HVAEConfig) -> int:
    """The bottleneck width of cells and heads at a stage of `width` channels (`model.bottleneck`)."""
    return max(1, int(width * cfg.bottleneck))


def _run(cell: nn.Module, h: Tensor, use_checkpoint: bool) -> Tensor:
    """A cell, recomputed in the backward instead of storing its activations when `use_checkpoint`."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(cell, h, use_reentrant=False)
    return cell(h)


def _groups(cfg: HVAEConfig) -> list[tuple[int, int]]:
    """(stage index, resolution) of every latent group, top first."""
    return [(s, stage.resolution) for s, stage in enumerate(cfg.stages) for _ in range(stage.groups)]


def _latent_dist(params: Tensor, cfg: HVAEConfig) -> Distribution:
    """Per-pixel latent distribution from a head's output: (mu, log sigma) halves, both soft-clamped to
    +-`model.soft_clamp`, sigma then smoothly below `model.sigma_max`; or Bernoulli logits."""
    if cfg.latent == "gaussian":
        mu, log_sigma = params.chunk(2, dim=1)
        c = cfg.soft_clamp
        if c is not None:
            mu, log_sigma = c * torch.tanh(mu / c), c * torch.tanh(log_sigma / c)
        if cfg.sigma_max is not None:
            top = math.log(cfg.sigma_max)
            log_sigma = top - F.softplus(top - log_sigma)
        return Gaussian(mu, log_sigma)
    return Bernoulli(params)


class HVAEDecoder(Decoder):
    """Top-down generator; see the module docstring. Latents are named z0 (top), z1, ... in ancestral order.

    A subclass with `conditioned = True` (seg_hvae) puts its own top latent above the groups: every group, z0
    included, then has a prior head, and `_context(z)` gives per stage a feature map added to h where the stage
    begins.
    """

    conditioned: ClassVar[bool] = False

    def __init__(self, cfg: HVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        groups = _groups(cfg)
        self.group_names = tuple(f"z{i}" for i in range(len(groups)))
        self.latent_names = self.group_names
        self.latent_shapes = {f"z{i}": (cfg.latent_channels, r, r) for i, (_, r) in enumerate(groups)}
        self.top_family = cfg.latent
        per_latent = 2 * cfg.latent_channels if cfg.latent == "gaussian" else cfg.latent_channels
        scale = 1.0 / math.sqrt(sum(cfg.stages[s].decoder_cells for s, _ in groups))
        first = cfg.stages[0]
        self.h_init = nn.Parameter(torch.zeros(1, first.width, first.resolution, first.resolution))
        middle = [_middle(stage.width, cfg) for stage in cfg.stages]
        self.priors = nn.ModuleList(Head(cfg.stages[s].width, middle[s], per_latent, r)
                                    if i or self.conditioned else nn.Identity() for i, (s, r) in enumerate(groups))
        self.projections = nn.ModuleList(nn.Conv2d(cfg.latent_channels, cfg.stages[s].width, 1) for s, _ in groups)
        self.cells = nn.ModuleList(nn.Sequential(*(Cell(cfg.stages[s].width, middle[s], r, scale)
                                                   for _ in range(cfg.stages[s].decoder_cells))) for s, r in groups)
        self.widen = nn.ModuleList(nn.Conv2d(a.width, b.width, 1) for a, b in itertools.pairwise(cfg.stages))
        last = cfg.stages[-1].width
        channels = cfg.image_shape[0]
        self.out = nn.Conv2d(last, x_head_channels(cfg.x_dist, channels, cfg.num_mixtures), 3, padding=1)
        sigma_shape = cfg.image_shape if cfg.sigma == "per_dim" else ()
        self.x_head = XHead(cfg.x_dist, sigma_shape, channels=channels, num_mixtures=cfg.num_mixtures,
                            offset_shape=x_offset_shape(cfg))
        self._stage_of = [s for s, _ in groups]

    def _context(self, z: Latents) -> list[Tensor] | None:
        """Per stage, a map added to h where the stage begins (conditioned subclasses); None: nothing."""
        return None

    def _next_stage(self, h: Tensor, stage: int, context: list[Tensor] | None) -> Tensor:
        """h at the next resolution: upsampled (nearest), widened, plus that stage's context."""
        res = self.cfg.stages[stage + 1].resolution
        h = self.widen[stage](F.interpolate(h, size=(res, res), mode="nearest"))
        return h if context is None else h + context[stage + 1]

    def _walk(self, z: Latents | None, posterior: Posterior | None, generator: torch.Generator | None,
              reparam: bool) -> tuple[TopDown, Tensor]:
        """The top-down pass; also returns the final state h (B, width, H, W) for p(x|z)."""
        z = dict(z or {})
        batch = next(iter(z.values())).shape[0] if z else None
        context = self._context(z)
        priors: dict[str, Distribution] = {}
        states: dict[str, Tensor] = {}
        h, stage = None, 0
        for i, name in enumerate(self.group_names):
            s = self._stage_of[i]
            if h is None:  # a copy, never a view of the parameter: ZeRO-3 frees parameters after the forward
                h = self.h_init.clone().expand(batch or 1, -1, -1, -1)
                h = h if context is None else h + context[0]
            while stage < s:
                h = self._next_stage(h, stage, context)
                stage += 1
            p = _latent_dist(self.priors[i](h), self.cfg) if i or self.conditioned else None
            if p is not None:
                priors[name] = p
            states[name] = h
            if name not in z:
                z[name] = draw(pick(name, p, h, posterior), generator, reparam)
            if batch is None:  # the top latent's batch sets the state's
                batch = z[name].shape[0]
                h = h.expand(batch, -1, -1, -1)
            h = h + self.projections[i](z[name].to(h.dtype))
            for cell in self.cells[i]:
                h = _run(cell, h, self.cfg.checkpoint_cells)
        while stage < len(self.cfg.stages) - 1:
            h = self._next_stage(h, stage, context)
            stage += 1
        return TopDown(z, priors, states), h

    def _top_down(self, z: Latents | None = None, posterior: Posterior | None = None,
                  generator: torch.Generator | None = None, reparam: bool = False) -> TopDown:
        return self._walk(z, posterior, generator, reparam)[0]

    def _x_from(self, h: Tensor) -> Distribution:
        return unpack(self.x_head(self.out(F.gelu(h))))  # (B, width, H, W) -> p(x|z) over (B, C, H, W)

    def _x_dist(self, z: Latents) -> Distribution:
        return self._x_from(self._walk(z, None, None, False)[1])

    def _conditionals(self, z: Latents) -> dict[str, Distribution]:
        walk, h = self._walk(z, None, None, False)
        return {**walk.priors, "x": self._x_from(h)}

    def _sample(self, z_top: Tensor, generator: torch.Generator | None = None,
                reparam: bool = False) -> tuple[Latents, Tensor, dict[str, Distribution]]:
        walk, h = self._walk({self.latent_names[0]: z_top}, None, generator, reparam)
        p_x = self._x_from(h)
        return walk.z, draw(p_x, generator, reparam), {**walk.priors, "x": p_x}


class HVAEEncoder(Encoder):
    """Bottom-up features at every resolution and one posterior head per latent group (module docstring)."""

    def __init__(self, cfg: HVAEConfig) -> None:
        super().__init__()
        self.analytic_kl = True  # q and p factorise over the same groups in the same order
        self.cfg = cfg
        groups = _groups(cfg)
        self.latent_names = tuple(f"z{i}" for i in range(len(groups)))
        self._resolution = {f"z{i}": r for i, (_, r) in enumerate(groups)}
        stages = cfg.stages
        scale = 1.0 / math.sqrt(sum(s.encoder_cells for s in stages))
        self.stem = nn.Conv2d(cfg.image_shape[0], stages[-1].width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.ModuleList(Cell(s.width, _middle(s.width, cfg), s.resolution, scale)
                          for _ in range(s.encoder_cells)) for s in stages)
        self.narrow = nn.ModuleList(nn.Conv2d(b.width, a.width, 1) for a, b in itertools.pairwise(stages))
        per_latent = 2 * cfg.latent_channels if cfg.latent == "gaussian" else cfg.latent_channels
        self.posteriors = nn.ModuleList(Head(2 * stages[s].width, _middle(stages[s].width, cfg),
                                             per_latent, r) for s, r in groups)

    def _features(self, x: Tensor) -> dict[int, Tensor]:
        """Resolution -> e_r(x) (B, width_r, r, r), from the full resolution down."""
        h = self.stem(x)
        out = {}
        for s in range(len(self.cfg.stages) - 1, -1, -1):
            stage = self.cfg.stages[s]
            if h.shape[-1] != stage.resolution:
                h = self.narrow[s](F.adaptive_avg_pool2d(h, stage.resolution))
            for cell in self.blocks[s]:
                h = _run(cell, h, self.cfg.checkpoint_cells)
            out[stage.resolution] = h
        return out

    def _posterior(self, features: dict[int, Tensor], name: str, state: Tensor) -> Distribution:
        e = features[self._resolution[name]]
        head = self.posteriors[self.latent_names.index(name)]
        return _latent_dist(head(torch.cat([e, state.expand(e.shape[0], -1, -1, -1).to(e.dtype)], dim=1)),
                            self.cfg)

    def _sample(self, x: Tensor, decoder: Decoder, generator: torch.Generator | None = None,
                reparam: bool = False) -> Sample:
        return self._sample_groups(self._features(x), decoder, {}, generator, reparam)

    def _sample_groups(self, features: dict[int, Tensor], decoder: Decoder, given: Latents,
                       generator: torch.Generator | None, reparam: bool) -> Sample:
        """Every group drawn from its posterior in ONE decoder top-down call; `given` latents are fixed there."""
        q: dict[str, Distribution] = {}

        def posterior(name: str, p: Distribution | None, state: Tensor | None) -> Distribution:
            assert state is not None, "the hvae decoder passes its state to the posterior"
            q[name] = self._posterior(features, name, state if reparam else state.detach())
            return q[name]

        return decoder.top_down(given or None, posterior=posterior, generator=generator, reparam=reparam).z, q

    def _conditionals(self, x: Tensor, z: Latents, decoder: Decoder) -> dict[str, Distribution]:
        return self._group_conditionals(self._features(x), z, decoder)

    def _group_conditionals(self, features: dict[int, Tensor], z: Latents,
                            decoder: Decoder) -> dict[str, Distribution]:
        with torch.no_grad():  # detaching rule: the decoder's states are constants in the encoder step
            states = decoder.top_down(z).states
        return {name: self._posterior(features, name, states[name]) for name in self.latent_names}


def build_players(cfg: HVAEConfig) -> Players:
    return Players(encoder=HVAEEncoder(cfg), decoder=HVAEDecoder(cfg))
