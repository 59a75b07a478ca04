"""p(x|z) for 8-bit colour images: the discretised mixture of logistics (PixelCNN++, Salimans et al. 2017; the
likelihood behind the bits/dim that VDVAE and NVAE report), as a `Distribution`.

Values are images in [0, 1] on the 1/255 grid (the stream's uint8 / 255). Each pixel is a mixture of K
components; within a component the C channels are logistics, channel c's mean shifted linearly by the values
of the channels before it (c = 1 by the red value, c = 2 by red and green), so the colours of one pixel are
correlated. Each logistic is discretised into 256 bins of width 2/255 on [-1, 1], the edge bins taking the
tails. Pure torch: must not import `runtime`, deepspeed or any I/O.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from symeq_dist.models.distributions import Distribution

BIN = 1.0 / 255.0  # half a bin on the [-1, 1] scale
MIN_LOG_SCALE = -7.0


def num_params(channels: int, num_mixtures: int) -> int:
    """Output channels of the network head: per component a logit, and per channel a mean, a log scale and
    (for the channels after the first) the coefficients of the channels before it."""
    return num_mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)


class DiscretizedLogisticMixture(Distribution):
    """K-component discretised logistic mixture per pixel; `params` (B, num_params(C, K), H, W) from a head."""

    def __init__(self, params: Tensor, channels: int, num_mixtures: int) -> None:
        batch, _, height, width = params.shape
        k, c = num_mixtures, channels
        self.channels, self.num_mixtures = c, k
        self.logits = params[:, :k]  # (B, K, H, W)
        rest = params[:, k:].reshape(batch, k, -1, height, width)  # (B, K, 2C + C(C-1)/2, H, W)
        self.means = rest[:, :, :c]  # (B, K, C, H, W)
        self.log_scales = rest[:, :, c:2 * c].clamp(min=MIN_LOG_SCALE)
        self.coeffs = torch.tanh(rest[:, :, 2 * c:])  # (B, K, C(C-1)/2, H, W): channel c on channels < c

    def _shifted_means(self, y: Tensor) -> Tensor:
        """(B, K, C, H, W): channel c's mean plus the coefficients times the values y of channels < c."""
        means = [self.means[:, :, 0]]
        index = 0
        for c in range(1, self.channels):
            shift = sum(self.coeffs[:, :, index + j] * y[:, None, j] for j in range(c))
            index += c
            means.append(self.means[:, :, c] + shift)
        return torch.stack(means, dim=2)

    def log_prob(self, value: Tensor) -> Tensor:
        """(B,) log-probability of the 8-bit image `value` in [0, 1] (B, C, H, W), float32 throughout."""
        y = value.float() * 2.0 - 1.0  # [-1, 1]
        means = self._shifted_means(y).float()
        log_scales = self.log_scales.float()
        centred = y[:, None] - means  # (B, K, C, H, W)
        inv = torch.exp(-log_scales)
        plus, minus = inv * (centred + BIN), inv * (centred - BIN)
        log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus): the bin at -1 takes the lower tail
        log_one_minus_cdf_minus = -F.softplus(minus)  # the bin at +1 takes the upper tail
        delta = torch.sigmoid(plus) - torch.sigmoid(minus)
        mid = inv * centred
        log_pdf_mid = mid - log_scales - 2.0 * F.softplus(mid)  # for bins whose mass underflows: density x width
        log_mid = torch.where(delta > 1e-5, torch.log(delta.clamp(min=1e-12)), log_pdf_mid + torch.log(torch.tensor(
            2.0 * BIN)))
        log_probs = torch.where(y[:, None] < -0.999, log_cdf_plus,
                                torch.where(y[:, None] > 0.999, log_one_minus_cdf_minus, log_mid))
        per_component = log_probs.sum(dim=2) + torch.log_softmax(self.logits.float(), dim=1)  # (B, K, H, W)
        return torch.logsumexp(per_component, dim=1).reshape(value.shape[0], -1).sum(dim=1)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """An 8-bit image in [0, 1] (B, C, H, W): a component per pixel, then each channel's logistic."""
        with torch.no_grad():
            batch, k, height, width = self.logits.shape
            probs = torch.softmax(self.logits.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, k)
            pick = torch.multinomial(probs, 1, generator=generator).reshape(batch, 1, 1, height, width)
            take = lambda t: t.float().gather(1, pick.expand(-1, 1, t.shape[2], -1, -1))[:, 0]  # noqa: E731
            means, log_scales, coeffs = take(self.means), take(self.log_scales), take(self.coeffs)
            u = torch.rand(means.shape, generator=generator, device=means.device).clamp(1e-5, 1.0 - 1e-5)
            noise = torch.exp(log_scales) * (torch.log(u) - torch.log1p(-u))  # (B, C, H, W)
            y, index = [], 0
            for c in range(self.channels):
                shift = sum(coeffs[:, index + j] * y[j] for j in range(c)) if c else 0.0
                index += c
                y.append((means[:, c] + shift + noise[:, c]).clamp(-1.0, 1.0))
            return torch.round((torch.stack(y, dim=1) + 1.0) * 127.5) / 255.0

    def rsample(self, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError("DiscretizedLogisticMixture has no reparametrised sample; x is observed in "
                                  "both games (use sample())")

    def mean(self) -> Tensor:
        """Per pixel the mixture-weighted component means, each channel shifted by the means before it."""
        with torch.no_grad():
            weights = torch.softmax(self.logits.float(), dim=1)[:, :, None]  # (B, K, 1, H, W)
            means, index = [self.means[:, :, 0].float()], 0
            for c in range(1, self.channels):
                shift = sum(self.coeffs[:, :, index + j].float() * means[j] for j in range(c))
                index += c
                means.append(self.means[:, :, c].float() + shift)
            y = (weights * torch.stack(means, dim=2).clamp(-1.0, 1.0)).sum(dim=1)
            return (y + 1.0) / 2.0

    def mode(self) -> Tensor:
        return self.mean()

    def mutual_information(self) -> Tensor | None:
        """Not measured for this factor (a 256-way distribution per pixel and channel); the MI monitors skip it."""
        return None
