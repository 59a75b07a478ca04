"""Likelihood of held-out data in bits per dimension, with the encoder as the proposal (both games).

    -log p(x) <= E_{z~q(z|x)} [log q(z|x) - log p(x, z)]                          (negative ELBO, K = 1)
    -log p(x) <= -E [log (1/K) sum_k p(x, z_k) / q(z_k|x)],  z_k ~ q(z|x)          (importance weighted)

with log p(x, z) = log pi(z_0) + sum_t log p(z_t | z_<t) + log p(x | z). The bounds need the prior's density,
so they exist for closed-form priors only. Bits per dimension = bound / (D ln 2) for discrete likelihoods
(Bernoulli pixels, the 8-bit logistic mixture); a Gaussian p(x|z) is a density on [0, 1]^D, so its figure adds
log2(256) = 8 per dimension (the usual dequantised comparison) and is marked as such. Must not import `train`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from symeq_dist.models.distributions import Gaussian


@torch.no_grad()
def log_weights(encoder: Any, decoder: Any, prior: Any, x: Tensor, num_samples: int,
                generator: torch.Generator) -> tuple[Tensor, bool]:
    """(K, B) float64: log p(x, z_k) - log q(z_k | x) for K draws z_k ~ q(z|x); and whether p(x|z) is discrete."""
    out, discrete = [], True
    top = decoder.latent_names[0]
    for _ in range(num_samples):
        z, q = encoder.sample(x, decoder, generator)
        p = decoder.conditionals(z)
        log_q = sum(q[name].log_prob(z[name]) for name in decoder.latent_names)
        log_p = prior.distribution(x.shape[0], x.device).log_prob(z[top]) + p["x"].log_prob(x)
        log_p = log_p + sum(p[name].log_prob(z[name]) for name in decoder.latent_names[1:])
        out.append((log_p - log_q).double())
        discrete = not isinstance(p["x"], Gaussian)
    return torch.stack(out), discrete


def bits_per_dim(encoder: Any, decoder: Any, prior: Any, batches: Iterable[Tensor], *, num_samples: int,
                 generator: torch.Generator) -> dict[str, Any]:
    """The negative ELBO and, for num_samples > 1, the importance-weighted bound, averaged over `batches`.

    Returns:
        {"elbo_bpd", "iw_bpd" (None when num_samples == 1), "num_samples", "num_images", "nats_per_dim",
         "discrete": whether p(x|z) is a probability (else a density: +8 bits per dimension added)}.
    """
    if not hasattr(prior, "distribution"):
        raise ValueError("bits/dim needs the prior's density; this prior only samples (an implicit prior)")
    elbo_sum = iw_sum = 0.0
    images, dims, discrete = 0, 0, True
    for x in batches:
        weights, discrete = log_weights(encoder, decoder, prior, x, num_samples, generator)  # (K, B)
        elbo_sum += float(weights.mean(dim=0).sum())
        iw_sum += float((torch.logsumexp(weights, dim=0) - math.log(num_samples)).sum())
        images, dims = images + x.shape[0], x[0].numel()
    if not images:
        raise ValueError("bits/dim needs at least one held-out image")
    offset = 0.0 if discrete else 8.0

    def bpd(total: float) -> float:
        return -total / images / dims / math.log(2) + offset

    return {"elbo_bpd": bpd(elbo_sum), "iw_bpd": bpd(iw_sum) if num_samples > 1 else None,
            "num_samples": num_samples, "num_images": images, "nats_per_dim": -elbo_sum / images / dims,
            "discrete": discrete}
