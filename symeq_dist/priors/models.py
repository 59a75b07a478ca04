"""Model families of a separately trained prior pi(z) over latent codes (an implicit prior: the game only samples).

`DiffusionPrior` (DDPM with eps-prediction and a cosine schedule, DDIM sampling) models real-valued codes;
`MADEPrior` (masked autoregressive Bernoulli net) models 0/1 codes. `build_prior_model` picks one by kind
(registry `PRIOR_MODELS`) and checks it against the codes. Pure torch: must not import `runtime`, `train`,
deepspeed or accelerate (the prior-model trainer owns those).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PriorModel(nn.Module):
    """Base of the prior-model families: a trainable pi(z) over codes of shape `shape`.

    `loss(z)` is the scalar training loss of a batch (also reachable as `forward`, so DDP/accelerate wrappers
    that hook the forward see every training step); `sample(n)` draws codes, deterministic given the generator.
    """

    family: ClassVar[str]  # "gaussian" (real-valued codes) or "bernoulli" (0/1 codes)

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.loss(z, generator)

    def loss(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scalar fp32 training loss of the batch z (n, *shape), a mean over the batch."""
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
        """(n, *shape) float32 codes on `device`; the same generator state gives the same codes."""
        raise NotImplementedError


# ---------------------------------------------------------------- diffusion (real-valued codes)

def noise_schedule(kind: str, timesteps: int) -> Tensor:
    """alpha_bar_t for t = 0..T-1 (float64): the signal fraction of x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps.

    "cosine": Nichol & Dhariwal 2021, ab(t) = f(t)/f(0) with f(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008,
    betas clipped at 0.999 (so the last step keeps a little signal). "linear": Ho et al. 2020, betas from
    1e-4 to 0.02, rescaled by 1000/T so short schedules still reach noise.
    """
    if kind == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    elif kind == "linear":
        scale = 1000 / timesteps
        betas = torch.linspace(1e-4 * scale, min(0.02 * scale, 0.999), timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"schedule must be 'cosine' or 'linear', got {kind!r}")
    return torch.cumprod(1 - betas, dim=0)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding (n,) -> (n, 2·(dim // 2)) of the (integer) diffusion times, periods up to 10^4."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class DenoiserBlock(nn.Module):
    """Pre-norm residual block x + W2 SiLU(norm(W1 SiLU(norm x) + time)): Linear for vectors, 3x3 conv for maps.

    The norm is GroupNorm over up to 32 channel groups for maps and one group (LayerNorm) for vectors: groups of a
    few features alone would reduce each group to the signs of its differences.
    """

    def __init__(self, width: int, time_dim: int, *, conv: bool) -> None:
        super().__init__()
        layer = (lambda: nn.Conv2d(width, width, 3, padding=1)) if conv else (lambda: nn.Linear(width, width))
        groups = math.gcd(32, width) if conv else 1
        self.norm1, self.norm2 = nn.GroupNorm(groups, width), nn.GroupNorm(groups, width)
        self.layer1, self.layer2 = layer(), layer()
        self.time = nn.Linear(time_dim, width)

    def forward(self, x: Tensor, time: Tensor) -> Tensor:  # x (n, W) or (n, W, H, W'), time (n, time_dim)
        h = self.layer1(F.silu(self.norm1(x)))
        h = h + self.time(time).view(*time.shape[:1], -1, *[1] * (x.dim() - 2))  # one shift per channel
        return x + self.layer2(F.silu(self.norm2(h)))


class Denoiser(nn.Module):
    """v_theta(x_t, t): an MLP for vector codes (C,), a same-resolution residual conv net for maps (C, H, W)."""

    def __init__(self, shape: tuple[int, ...], *, hidden: int, depth: int) -> None:
        super().__init__()
        conv = len(shape) == 3
        channels = shape[0]
        self.hidden = hidden
        time_dim = 2 * (hidden // 2)
        self.time = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1) if conv else nn.Linear(channels, hidden)
        self.blocks = nn.ModuleList(DenoiserBlock(hidden, hidden, conv=conv) for _ in range(depth))
        self.out_norm = nn.GroupNorm(math.gcd(32, hidden) if conv else 1, hidden)
        self.out = nn.Conv2d(hidden, channels, 3, padding=1) if conv else nn.Linear(hidden, channels)
        nn.init.zeros_(self.out.weight)  # start at a zero prediction
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:  # x (n, *shape), t (n,) integer times -> (n, *shape)
        time = self.time(timestep_embedding(t, self.hidden))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, time)
        return self.out(F.silu(self.out_norm(h)))


class DiffusionPrior(PriorModel):
    """A diffusion model (DDPM, Ho et al. 2020) over real-valued codes with v-prediction (Salimans & Ho 2022): the
    network predicts v = sqrt(a) eps - sqrt(1 - a) x0 (a = alpha_bar_t), trained by MSE at uniform t, sampled by
    DDIM (eta = 0).

    Why v and not eps: from eps, x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) divides by sqrt(a) ~ 1e-3 at the noisiest
    times of the cosine schedule, so small eps errors there set the samples' scale (measured on 16-d Gaussian codes
    of std 1.5, 1500 steps, 50-1000 DDIM steps: sampled std 1.77-2.05 with eps, 1.47-1.50 with v);
    x0 = sqrt(a) x_t - sqrt(1 - a) v is well conditioned at every t.

    Codes are modelled after a fixed per-element normalisation (z - mean)/std (buffers, default 0 and 1, set
    once from data by `set_data_stats`, saved in `state_dict`). Sampling takes `sample_steps` evenly spaced
    trained times t_k = k·T // S (k = 0..S-1; S = T gives every time) and walks them from the last down to 0.
    `clip_x0` clamps DDIM's predicted clean code (normalised units) at each step; None disables the clamp.
    """

    family = "gaussian"

    def __init__(self, shape: tuple[int, ...], *, hidden: int = 256, depth: int = 3, timesteps: int = 1000,
                 sample_steps: int = 100, schedule: str = "cosine", clip_x0: float | None = 5.0) -> None:
        super().__init__(shape)
        if len(self.shape) not in (1, 3):
            raise ValueError(f"DiffusionPrior models vector (C,) or map (C, H, W) codes, got shape {self.shape}")
        if not 1 <= sample_steps <= timesteps:
            raise ValueError(f"sample_steps must lie in 1..timesteps={timesteps}, got {sample_steps}")
        self.timesteps, self.sample_steps, self.clip_x0 = timesteps, sample_steps, clip_x0
        self.denoiser = Denoiser(self.shape, hidden=hidden, depth=depth)
        self.register_buffer("alpha_bar", noise_schedule(schedule, timesteps).float(), persistent=False)
        self.register_buffer("mean", torch.zeros(self.shape))
        self.register_buffer("std", torch.ones(self.shape))

    @torch.no_grad()
    def set_data_stats(self, z: Tensor) -> None:
        """Fix the normalisation to the per-element mean and std of the codes z (n, *shape), n >= 2."""
        if z.shape[1:] != self.shape or z.shape[0] < 2:
            raise ValueError(f"set_data_stats needs a batch (n >= 2, *{self.shape}) of codes, got {tuple(z.shape)}")
        z = z.float()
        self.mean.copy_(z.mean(0))
        self.std.copy_(z.std(0).clamp_min(1e-6))  # a constant element normalises to 0, not to inf

    def _expand(self, values: Tensor) -> Tensor:
        """(n,) -> (n, 1, ...) broadcastable against a batch of codes."""
        return values.view(-1, *[1] * len(self.shape))

    def loss(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """E_t,eps |v - v_theta(x_t, t)|² (mean over elements and batch), t uniform on 0..T-1."""
        x0 = (z.float() - self.mean) / self.std
        t = torch.randint(0, self.timesteps, (x0.shape[0],), generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device)
        alpha_bar = self._expand(self.alpha_bar[t])
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
        v = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
        return F.mse_loss(self.denoiser(x_t, t).float(), v)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
        """DDIM (eta = 0) from x_T ~ N(0, I) over `sample_steps` times; returns de-normalised codes (n, *shape)."""
        x = torch.randn((n, *self.shape), generator=generator, device=device)
        times = torch.arange(self.sample_steps, device=device) * self.timesteps // self.sample_steps
        for k in reversed(range(self.sample_steps)):
            alpha_bar = self.alpha_bar[times[k]]
            alpha_bar_prev = self.alpha_bar[times[k - 1]] if k > 0 else alpha_bar.new_ones(())
            v = self.denoiser(x, times[k].expand(n)).float()
            x0 = alpha_bar.sqrt() * x - (1 - alpha_bar).sqrt() * v
            if self.clip_x0 is not None:
                x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()  # consistent with the (clamped) x0
            x = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev).sqrt() * eps
        return x * self.std + self.mean


# ---------------------------------------------------------------- MADE (0/1 codes)

class MaskedLinear(nn.Linear):
    """nn.Linear whose weight is multiplied by a fixed 0/1 mask (out, in): the autoregressive connectivity."""

    def __init__(self, n_in: int, n_out: int, mask: Tensor) -> None:
        super().__init__(n_in, n_out)
        self.register_buffer("mask", mask.float())  # persistent: a checkpoint restores its own connectivity

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADEPrior(PriorModel):
    """MADE (Germain et al. 2015): p(z) = prod_d Bern(z_{o(d)} | z_{o(<d)}) over the flattened code.

    The ordering o is a permutation of the D = prod(shape) dimensions drawn from `ordering_seed` (default 0), or
    the natural order 0..D-1 when `ordering_seed` is None; it and the masks are buffers, so a checkpoint carries
    them. Hidden unit k of every layer gets degree 1 + k mod (D - 1) (every degree present, no randomness), so
    output d sees exactly the inputs before it. `depth` masked hidden layers of width `hidden`, ReLU.
    """

    family = "bernoulli"

    def __init__(self, shape: tuple[int, ...], *, hidden: int = 512, depth: int = 2,
                 ordering_seed: int | None = 0) -> None:
        super().__init__(shape)
        dim = math.prod(self.shape)
        if depth < 1:
            raise ValueError(f"MADEPrior needs depth >= 1 hidden layers, got {depth}")
        if ordering_seed is None:
            order = torch.arange(dim)
        else:
            order = torch.randperm(dim, generator=torch.Generator().manual_seed(ordering_seed))
        self.register_buffer("order", order)  # order[d] = the flattened dimension sampled at step d
        input_degree = torch.empty(dim, dtype=torch.long)
        input_degree[order] = torch.arange(1, dim + 1)  # dimension order[d] has degree d + 1
        hidden_degree = 1 + torch.arange(hidden) % max(dim - 1, 1)
        layers: list[nn.Module] = []
        degree_in = input_degree
        for _ in range(depth):
            layers += [MaskedLinear(len(degree_in), hidden, hidden_degree[:, None] >= degree_in[None]), nn.ReLU()]
            degree_in = hidden_degree
        layers.append(MaskedLinear(hidden, dim, input_degree[:, None] > degree_in[None]))
        self.net = nn.Sequential(*layers)

    def logits(self, z: Tensor) -> Tensor:
        """Bernoulli logits (n, D) of every flattened dimension given the ones before it in the ordering."""
        return self.net(z.float().reshape(z.shape[0], -1))

    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z) in nats, (n,), for 0/1 codes z (n, *shape)."""
        target = z.float().reshape(z.shape[0], -1)
        return -F.binary_cross_entropy_with_logits(self.logits(z), target, reduction="none").sum(1)

    def loss(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Negative log-likelihood in nats per code, mean over the batch (no randomness: `generator` unused)."""
        return -self.log_prob(z).mean()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
        """D sequential passes: pass d draws dimension order[d] from its conditional (uniforms from `generator`)."""
        z = torch.zeros(n, self.order.numel(), device=device)
        for d in self.order.tolist():
            p = torch.sigmoid(self.logits(z)[:, d])
            z[:, d] = (torch.rand(n, generator=generator, device=device) < p).float()
        return z.view(n, *self.shape)


# ---------------------------------------------------------------- registry

PRIOR_MODELS: dict[str, type[PriorModel]] = {"diffusion": DiffusionPrior, "made": MADEPrior}


def build_prior_model(kind: str, shape: tuple[int, ...], family: str, **options: Any) -> PriorModel:
    """The prior model `kind` over codes of `shape` and `family`, with the family's keyword `options`.

    Raises:
        ValueError: unknown kind, a kind that does not model `family` codes, or an option the kind does not take
            (each message names the fix).
    """
    if kind not in PRIOR_MODELS:
        raise ValueError(f"unknown prior model kind {kind!r}; choose one of {sorted(PRIOR_MODELS)}")
    cls = PRIOR_MODELS[kind]
    if cls.family != family:
        fits = sorted(k for k, c in PRIOR_MODELS.items() if c.family == family)
        fix = f"use kind {fits[0]!r} for {family} codes" if fits else f"no prior model fits {family} codes"
        raise ValueError(f"prior model {kind!r} models {cls.family} codes, but the codes are {family}; {fix}")
    valid = [p.name for p in inspect.signature(cls).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"prior model {kind!r}: unknown option(s) {unknown}; valid options: {valid}")
    return cls(tuple(shape), **options)


__all__ = ["PRIOR_MODELS", "DiffusionPrior", "MADEPrior", "PriorModel", "build_prior_model"]
