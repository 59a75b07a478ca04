"""Consistency diagnostics of one evaluation (METHOD §5, §8, §13.3): where encoder and decoder disagree.

Three measurements, all streamed (bounded memory), all from the sets `run.py` already draws:

- **joint NLL pairs.** For every factor f of either player (encoder q(z_t | ...), decoder p(z_t | z_<t) and
  p(x | z)), the mean −log f per dimension under the two joints the game pairs: the decoder's joint
  π(z) p(x|z) ("dreams": z from the prior, x sampled from the decoder) and the data joint π(x) q(z|x) ("data":
  reference images, z sampled from the encoder). The encoder trains on the dreams column of its factors, the
  decoder on the data column of its factors. For a consistent pair (π(x) q(z|x) = π(z) p(x|z)) both columns are
  expectations of the same function under the same joint, so `gap` = dreams − data is 0 for every factor;
  an encoder whose dreams value is much lower than its data value is fitted to p(x) but not to π(x)
  (the wake-sleep weakness, METHOD §5).
- **posterior spread.** Mean per-dimension variance (Gaussian σ², Bernoulli p(1 − p)) and entropy of
  q(z_top | x) on data and on dreams, beside the prior's per-dimension variance.
- **code drift.** Streamed mean/covariance of top-latent codes: prior samples, q on data (the aggregate
  posterior), q on dreams, and q at each limiting-chain length; per set the mean of the per-dimension means
  and variances and the Fréchet distance to the prior samples' Gaussian (0 up to sampling noise when the
  codes are distributed like π(z), which a consistent pair's chain keeps at every length). A second,
  independent set of prior samples ("prior_resampled") shows that noise floor at the same n.

Must not import train, tensorboard or deepspeed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from symeq_dist.errors import InputError
from symeq_dist.eval.frechet import GaussianStats, frechet_distance_stats
from symeq_dist.models.distributions import Bernoulli, Distribution, Gaussian

HALF_LOG_2PI_E = 0.5 * math.log(2.0 * math.pi * math.e)  # entropy of N(0, 1) in nats
PRIOR_VARIANCE = {"gaussian": 1.0, "bernoulli": 0.25}  # per dimension: N(0, 1) and Bern(1/2)
MAX_CODE_DIMS = 4096  # code drift keeps a D x D float64 covariance per set: 128 MiB each at this size


def parse_chain_lengths(value: int | str | Iterable[int]) -> tuple[int, ...]:
    """Chain lengths as a sorted tuple without repeats: 1000, "1000", "0,10,100,1000" or [0, 10, 1000].

    Raises:
        InputError: empty, not integers, or negative (the message shows the accepted form).
    """
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            lengths = [int(p) for p in parts]
        except ValueError:
            raise InputError(f"--chain-steps takes a number or a comma-separated list such as 0,10,100,1000; "
                             f"got {value!r}") from None
    elif isinstance(value, int):
        lengths = [value]
    else:
        lengths = [int(v) for v in value]
    if not lengths or min(lengths) < 0:
        raise InputError(f"chain steps must be one or more integers >= 0 (e.g. 0,10,100,1000); got {value!r}")
    return tuple(sorted(set(lengths)))


def spread(dist: Distribution) -> tuple[Tensor, Tensor] | None:
    """Per-dimension variance and entropy (nats) of a factorised posterior, each (B, D); None for other families."""
    if isinstance(dist, Gaussian):
        log_sigma = torch.broadcast_to(dist.log_sigma.float(), dist.mu.shape).reshape(dist.mu.shape[0], -1)
        return (2.0 * log_sigma).exp(), HALF_LOG_2PI_E + log_sigma
    if isinstance(dist, Bernoulli):
        logits = dist.logits.float().reshape(dist.logits.shape[0], -1)
        p = torch.sigmoid(logits)
        return p * (1.0 - p), F.softplus(-logits) + (1.0 - p) * logits
    return None


class Diagnostics:
    """Accumulates the three measurements chunk by chunk; `table()` gives the report's "diagnostics" section."""

    def __init__(self, top: str, top_family: str, code_dims: int) -> None:
        self.top, self.top_family, self.code_dims = top, top_family, code_dims
        self.nll: dict[tuple[str, str, str], list[float]] = {}  # (player, factor, where) -> [sum, count, dims]
        self.spread: dict[str, list[float]] = {}  # where -> [variance sum, entropy sum, count]
        self.codes: dict[str, GaussianStats] = {}

    @torch.no_grad()
    def add_nll(self, player: str, where: str, dists: dict[str, Distribution], values: dict[str, Tensor]) -> None:
        """−log f(value) of every factor f in `dists` (keyed like `values`), for samples of joint `where`."""
        for name, dist in dists.items():
            value = values[name]
            nll = -dist.log_prob(value).double()  # (B,)
            entry = self.nll.setdefault((player, name, where), [0.0, 0, value[0].numel()])
            entry[0] += float(nll.sum())
            entry[1] += len(nll)

    @torch.no_grad()
    def add_posterior(self, where: str, dist: Distribution) -> None:
        """The top latent's q(z_top | x) for a chunk of data or dream images."""
        measured = spread(dist)
        if measured is None:
            return
        variance, entropy = measured
        entry = self.spread.setdefault(where, [0.0, 0.0, 0])
        entry[0] += float(variance.double().mean(1).sum())
        entry[1] += float(entropy.double().mean(1).sum())
        entry[2] += len(variance)

    @torch.no_grad()
    def add_codes(self, set_name: str, codes: Tensor) -> None:
        """Top-latent codes (B, ...) of one set ("prior", "prior_resampled", "posterior_data", "posterior_dreams",
        "chain@L"). Skipped for a top latent of more than MAX_CODE_DIMS dimensions (a label map: 45,056 at 64^2)."""
        if self.code_dims > MAX_CODE_DIMS:
            return
        flat = codes.reshape(len(codes), -1).double()
        self.codes.setdefault(set_name, GaussianStats(flat.shape[1])).update(flat)

    def _nll_table(self) -> dict[str, dict[str, dict[str, float | int]]]:
        table: dict[str, dict[str, dict[str, float | int]]] = {}
        for (player, name, where), (total, count, dims) in sorted(self.nll.items()):
            row = table.setdefault(player, {}).setdefault(name, {"dims": dims})
            row[where] = total / max(count, 1) / dims
        for rows in table.values():
            for row in rows.values():
                if "dreams" in row and "data" in row:
                    row["gap"] = row["dreams"] - row["data"]
        return table

    def _code_table(self) -> dict[str, Any]:
        prior = self.codes.get("prior")
        table: dict[str, Any] = {"latent": self.top, "dims": self.code_dims}
        if self.code_dims > MAX_CODE_DIMS:
            table["skipped"] = (f"{self.code_dims} dimensions: a full covariance per set would take "
                                f"{self.code_dims ** 2 * 8 / 2 ** 30:.0f} GiB (the limit is {MAX_CODE_DIMS})")
        for name, stats in self.codes.items():
            if stats.count < 2:
                continue
            row = {"mean": float(stats.mean().mean()), "variance": float(stats.cov().diagonal().mean())}
            if prior is not None and name != "prior" and prior.count >= 2:
                row["fd_to_prior"] = frechet_distance_stats(prior, stats)
            table[name] = row
        return table

    def table(self) -> dict[str, Any]:
        """{"joint_nll": {player: {factor: {dims, dreams, data, gap}}} (nats per dimension),
        "posterior": {latent, family, prior_variance, data/dreams: {variance, entropy}} (per dimension),
        "codes": {latent, dims, <set>: {mean, variance, fd_to_prior}}}."""
        posterior: dict[str, Any] = {"latent": self.top, "family": self.top_family,
                                     "prior_variance": PRIOR_VARIANCE.get(self.top_family)}
        for where, (variance, entropy, count) in self.spread.items():
            posterior[where] = {"variance": variance / max(count, 1), "entropy": entropy / max(count, 1)}
        return {"joint_nll": self._nll_table(), "posterior": posterior, "codes": self._code_table()}
