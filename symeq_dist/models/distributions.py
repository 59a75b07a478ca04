"""Factorised distributions of the players' conditionals: Bernoulli, Gaussian, Categorical.

Dim 0 is the batch; every other dimension is an independent event dimension, so `log_prob` and `kl`
return (B,) sums. Likelihood reductions run in float32 (METHOD §3, §12). Pure torch: must not import
`dist`, `engines`, deepspeed or any I/O.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

HALF_LOG_2PI = 0.91894  # ½·log 2π exactly as in the reference losses (METHOD §3)
PROB_EPS = 1e-6  # probability smoothing a <- a(1 - eps) + eps/2 (KL, METHOD §9; MI, §13.3)


def _sum_event(t: Tensor) -> Tensor:
    """(B, ...) -> (B,): sum over every non-batch dimension."""
    return t.reshape(t.shape[0], -1).sum(dim=1)


def _smooth(p: Tensor, num_classes: int = 2) -> Tensor:
    """p(1 - eps) + eps/K: keeps probabilities away from 0 and 1 (K = 2 gives the reference ½·1e-6)."""
    return p * (1.0 - PROB_EPS) + PROB_EPS / num_classes


def _binary_entropy(p: Tensor) -> Tensor:
    """Elementwise entropy (nats) of Bern(p), p already smoothed into (0, 1)."""
    return -(p * p.log() + (1.0 - p) * (1.0 - p).log())


class Distribution:
    """A batch of factorised distributions; dim 0 is the batch, all other dims are event dims."""

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A detached sample (drawn under no_grad) on the parameters' device."""
        with torch.no_grad():
            return self.rsample(generator).detach()

    def rsample(self, generator: torch.Generator | None = None) -> Tensor:
        """A sample that is differentiable w.r.t. the parameters (reparametrised or ZGR)."""
        raise NotImplementedError

    def log_prob(self, value: Tensor) -> Tensor:
        """(B,) log-likelihood of `value`, summed over event dims, in float32."""
        raise NotImplementedError

    def mode(self) -> Tensor:
        """The most probable value (per factor)."""
        raise NotImplementedError

    def mean(self) -> Tensor:
        """The expectation (per factor)."""
        raise NotImplementedError

    def kl(self, other: Distribution) -> Tensor:
        """(B,) analytic KL(self || other), summed over event dims; `other` is of the same family."""
        raise NotImplementedError

    def mutual_information(self) -> Tensor | None:
        """(D,) per flattened event dim: MI (nats) between the variable and its conditioning input, or None
        for a family whose MI is not measured (the monitors skip it).

        The batch mixture of the B distributions is used as the marginal (METHOD §13.3).
        """
        raise NotImplementedError

    def _check_family(self, other: Distribution) -> None:
        if type(other) is not type(self):
            raise TypeError(f"KL between {type(self).__name__} and {type(other).__name__} is not implemented; "
                            "pass a distribution of the same family")


def _bits(p: Tensor, generator: torch.Generator | None) -> Tensor:
    """Bernoulli(p) bits as 1[u < p]: unlike torch.bernoulli a NaN probability gives a bit (0) instead of
    an exception, so a diverged network reaches the trainer's rank-agreed non-finite-loss check."""
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)
    return (u < p).to(p.dtype)


class Bernoulli(Distribution):
    """Independent bits with logits ℓ: p(b = 1) = σ(ℓ). Values are float tensors of 0/1."""

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits  # (B, ...)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            return _bits(torch.sigmoid(self.logits), generator)

    def rsample(self, generator: torch.Generator | None = None) -> Tensor:
        """ZGR (METHOD §9): forward value b ~ Bern(σ(ℓ)), backward ∂b/∂ℓ = J = stopgrad((b(1-p) + (1-b)p)/2)."""
        logits = self.logits
        p = torch.sigmoid(logits.detach())
        b = _bits(p, generator)
        jacobian = (b * (1.0 - p) + (1.0 - b) * p) / 2.0
        return b + jacobian * (logits - logits.detach())

    def log_prob(self, value: Tensor) -> Tensor:
        logits = self.logits.float()
        nll = F.binary_cross_entropy_with_logits(logits, value.float().expand_as(logits), reduction="none")
        return -_sum_event(nll)

    def mode(self) -> Tensor:
        """1[logits > 0] in the logits' dtype (float32 for fp32 networks; bf16 stays bf16)."""
        return (self.logits > 0).to(self.logits.dtype)

    def mean(self) -> Tensor:
        return torch.sigmoid(self.logits)

    def kl(self, other: Distribution) -> Tensor:
        """Per bit a log(a/c) + (1-a) log((1-a)/(1-c)), both probabilities smoothed first (METHOD §9)."""
        self._check_family(other)
        assert isinstance(other, Bernoulli)
        a = _smooth(torch.sigmoid(self.logits.float()))
        c = _smooth(torch.sigmoid(other.logits.float()))
        per_bit = a * (a.log() - c.log()) + (1.0 - a) * ((1.0 - a).log() - (1.0 - c).log())
        return _sum_event(per_bit)

    def mutual_information(self) -> Tensor:
        """MI_i = H(mean_b p_bi) - mean_b H(p_bi) (METHOD §13.3).

        The marginal is smoothed as in the reference (p(1-1e-6) + ½·1e-6); the conditional entropies are
        computed from the logits, H = softplus(-l) + (1 - p) l, which never takes the log of 0 and needs no
        smoothing (differs from the smoothed form by < 1e-5 nats per bit; 2x cheaper, it runs every step).
        """
        with torch.no_grad():
            logits = self.logits.float().reshape(self.logits.shape[0], -1)  # (B, D)
            p = torch.sigmoid(logits)
            conditional = (F.softplus(-logits) + (1.0 - p) * logits).mean(dim=0)
            return _binary_entropy(_smooth(p.mean(dim=0))) - conditional


class Gaussian(Distribution):
    """Diagonal Gaussian N(mu, sigma²); `log_sigma` broadcasts to `mu` (scalar, per-dim or per-sample)."""

    def __init__(self, mu: Tensor, log_sigma: Tensor) -> None:
        self.mu = mu  # (B, ...)
        self.log_sigma = log_sigma  # broadcastable to mu
        torch.broadcast_shapes(log_sigma.shape, mu.shape)  # fail early on a shape mismatch

    def rsample(self, generator: torch.Generator | None = None) -> Tensor:
        """mu + sigma ⊙ eps, eps ~ N(0, I)."""
        eps = torch.randn(self.mu.shape, generator=generator, device=self.mu.device, dtype=self.mu.dtype)
        return self.mu + self.log_sigma.exp() * eps

    def log_prob(self, value: Tensor) -> Tensor:
        """Per element -(0.91894 + log sigma + (x - mu)²/(2 sigma²)), summed."""
        mu, log_sigma = self.mu.float(), self.log_sigma.float()
        sq = (value.float() - mu) ** 2 * torch.exp(-2.0 * log_sigma) / 2.0
        return -_sum_event(torch.broadcast_to(HALF_LOG_2PI + log_sigma + sq, mu.shape))

    def mode(self) -> Tensor:
        return self.mu

    def mean(self) -> Tensor:
        return self.mu

    def kl(self, other: Distribution) -> Tensor:
        """Σ [log(σ_p/σ_q) + (σ_q² + (μ_q - μ_p)²)/(2σ_p²) - ½] with q = self, p = other (METHOD §9)."""
        self._check_family(other)
        assert isinstance(other, Gaussian)
        mu_q, ls_q = self.mu.float(), self.log_sigma.float()
        mu_p, ls_p = other.mu.float(), other.log_sigma.float()
        per_dim = ls_p - ls_q + ((2.0 * ls_q).exp() + (mu_q - mu_p) ** 2) / (2.0 * (2.0 * ls_p).exp()) - 0.5
        shape = torch.broadcast_shapes(per_dim.shape, self.mu.shape)
        return _sum_event(torch.broadcast_to(per_dim, shape))

    def mutual_information(self) -> Tensor:
        """Moment-matched approximation MI_i = ½ log(1 + Var_b(mu_bi) / mean_b(sigma_bi²)).

        Exact when the conditional means are themselves Gaussian over the batch and sigma is constant
        (the marginal is then N(m, V + sigma²)); otherwise an approximation. Population variance over B.
        """
        with torch.no_grad():
            mu = self.mu.float()
            var = torch.broadcast_to((2.0 * self.log_sigma.float()).exp(), mu.shape)
            mu, var = mu.reshape(mu.shape[0], -1), var.reshape(mu.shape[0], -1)  # (B, D)
            return 0.5 * torch.log1p(mu.var(dim=0, correction=0) / var.mean(dim=0))


class Categorical(Distribution):
    """Independent K-way categoricals; `logits` has the class dim at `dim`, values are integer classes.

    A value has the logits' shape without the class dim: logits (B, K, H, W), dim=1 -> value (B, H, W).
    `mode()` returns that integer argmax; `mean()` returns the class probabilities (the expected one-hot,
    class dim in place). `rsample` is not available (no estimator for categorical latents yet).
    """

    def __init__(self, logits: Tensor, dim: int = 1) -> None:
        dim = dim % logits.dim()
        if dim == 0:
            raise ValueError("Categorical: dim 0 is the batch; pass the class dim (>= 1)")
        self.logits = logits
        self.dim = dim

    def _log_probs(self) -> Tensor:
        """(B, ..., K): float32 log-probabilities with the class dim moved last."""
        return torch.log_softmax(self.logits.float().movedim(self.dim, -1), dim=-1)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            probs = self._log_probs().exp()  # (B, ..., K)
            flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
            return flat.reshape(probs.shape[:-1])

    def rsample(self, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError("Categorical.rsample: no reparametrised/ZGR estimator for categorical "
                                  "variables; use sample() (the symmetric game needs no gradient through samples)")

    def log_prob(self, value: Tensor) -> Tensor:
        logits = self.logits.float().movedim(self.dim, 1)
        return -_sum_event(F.cross_entropy(logits, value.long(), reduction="none"))

    def mode(self) -> Tensor:
        return self.logits.argmax(dim=self.dim)

    def mean(self) -> Tensor:
        return torch.softmax(self.logits, dim=self.dim)

    def kl(self, other: Distribution) -> Tensor:
        self._check_family(other)
        assert isinstance(other, Categorical)
        log_p, log_q = self._log_probs(), other._log_probs()
        per_dim = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
        shape = torch.broadcast_shapes(per_dim.shape, log_p.shape[:-1])
        return _sum_event(torch.broadcast_to(per_dim, shape))

    def mutual_information(self) -> Tensor:
        """MI_i = H(mean_b p_bi) - mean_b H(p_bi) with the categorical entropy; p smoothed p(1-eps) + eps/K."""
        with torch.no_grad():
            log_p = self._log_probs()
            num_classes = log_p.shape[-1]
            p = _smooth(log_p.exp(), num_classes).reshape(log_p.shape[0], -1, num_classes)  # (B, D, K)
            entropy = -(p * p.log()).sum(dim=-1)  # (B, D)
            p_bar = p.mean(dim=0)  # (D, K)
            return -(p_bar * p_bar.log()).sum(dim=-1) - entropy.mean(dim=0)


class OneHotCategorical(Categorical):
    """K-way categoricals with the class dim at 1 whose values are one-hot floats of the logits' shape: logits
    (B, K) for one class latent per sample (METHOD §7.4), or (B, K, H, W) for a per-pixel label map (a
    segmentation latent, §7.6); the form a network takes as input. Same log-likelihood, KL and MI as
    `Categorical`."""

    def __init__(self, logits: Tensor) -> None:
        if logits.dim() < 2:
            raise ValueError(f"OneHotCategorical takes logits (B, K, ...), got {tuple(logits.shape)}")
        super().__init__(logits, dim=1)

    def _one_hot(self, classes: Tensor) -> Tensor:
        return F.one_hot(classes, self.logits.shape[1]).movedim(-1, 1).to(self.logits.dtype)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        return self._one_hot(super().sample(generator))

    def log_prob(self, value: Tensor) -> Tensor:
        return _sum_event(torch.log_softmax(self.logits.float(), dim=1) * value.float())

    def mode(self) -> Tensor:
        return self._one_hot(self.logits.argmax(dim=1))


__all__ = ["HALF_LOG_2PI", "PROB_EPS", "Bernoulli", "Categorical", "Distribution", "Gaussian", "OneHotCategorical"]
