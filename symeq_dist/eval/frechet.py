"""Fréchet distance between feature Gaussians (FID / FD-clf maths, METHOD §13.2).

Owns the streaming feature statistics and the Fréchet distance. Pure numpy / scipy / torch: must not import
tensorboard, deepspeed or any other symeq_dist module.
"""

from __future__ import annotations

import warnings

import numpy as np
import numpy.typing as npt
import torch
from scipy import linalg
from torch import Tensor

IMAG_TOLERANCE = 1e-3  # largest |imaginary part| on the diagonal of sqrtm(s1 s2) accepted as rounding noise


class GaussianStats:
    """Streaming mean/covariance of features in float64: bounded memory for 10,000+ samples.

    Each chunk is centred on its own mean and merged with Chan et al.'s parallel update, so the
    scatter matrix never suffers the cancellation of sum(x x^T) - n mu mu^T (memory O(dim^2)).
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"GaussianStats needs a positive feature dimension, got dim={dim}")
        self.dim = dim
        self._count = 0
        self._mean = np.zeros(dim, dtype=np.float64)
        self._scatter = np.zeros((dim, dim), dtype=np.float64)  # sum of centred outer products

    def update(self, features: Tensor | np.ndarray) -> None:
        """Add a chunk of features, shape (n, dim), any float dtype (torch tensors may live on any device)."""
        if isinstance(features, Tensor):
            features = features.detach().to("cpu", torch.float64).numpy()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"GaussianStats(dim={self.dim}).update expects shape (n, {self.dim}), got {x.shape}; "
                             "flatten the features to one row per sample")
        n = x.shape[0]
        if n == 0:
            return
        chunk_mean = x.mean(axis=0)
        centred = x - chunk_mean
        delta = chunk_mean - self._mean
        total = self._count + n
        self._scatter += centred.T @ centred + np.outer(delta, delta) * (self._count * n / total)
        self._mean += delta * (n / total)
        self._count = total

    @property
    def count(self) -> int:
        """Number of samples seen."""
        return self._count

    def mean(self) -> np.ndarray:
        """Feature mean, shape (dim,)."""
        if self._count == 0:
            raise ValueError("GaussianStats.mean() before any update(); feed features first")
        return self._mean.copy()

    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by n - 1, like numpy.cov(rowvar=False) and pytorch-fid), shape (dim, dim)."""
        if self._count < 2:
            raise ValueError(f"GaussianStats.cov() needs at least 2 samples, has {self._count}; feed more features")
        return self._scatter / (self._count - 1)


def _check_shapes(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> None:
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be 1-d vectors of the same length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}) to match the means {mu1.shape}, "
                         f"got {sigma1.shape} and {sigma2.shape}")


def _sqrtm_checked(product: np.ndarray) -> tuple[np.ndarray, bool]:
    """sqrtm of a matrix product; the flag is False when scipy found it singular or the result is not finite."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        root = linalg.sqrtm(product)
    singular = any(issubclass(w.category, linalg.LinAlgWarning) for w in caught)
    return root, bool(np.isfinite(root).all()) and not singular


def frechet_distance(mu1: npt.ArrayLike, sigma1: npt.ArrayLike, mu2: npt.ArrayLike, sigma2: npt.ArrayLike,
                     eps: float = 1e-6) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + Tr(s1 + s2 - 2 sqrtm(s1 s2)) between two Gaussians.

    Follows pytorch-fid: when s1 s2 is singular or its square root is not finite, eps * I is added to both
    covariances; a negligible imaginary part of the root is dropped.

    Args:
        mu1, mu2: means, shape (d,).
        sigma1, sigma2: covariances, shape (d, d).
        eps: diagonal offset used only when the product is singular.

    Returns:
        The distance as a Python float.

    Raises:
        ValueError: shapes do not match, or the root has a significant imaginary part (> 1e-3).
    """
    m1, m2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    _check_shapes(m1, s1, m2, s2)
    root, ok = _sqrtm_checked(s1 @ s2)
    if not ok:
        offset = np.eye(m1.shape[0]) * eps
        s1, s2 = s1 + offset, s2 + offset
        root, _ = _sqrtm_checked(s1 @ s2)
    if not np.isfinite(root).all():
        raise ValueError("sqrtm(sigma1 @ sigma2) is not finite even with the eps offset; check the features for "
                         "NaN/inf or pass a larger eps")
    if np.iscomplexobj(root):
        imag = float(np.abs(np.diagonal(root).imag).max())
        if imag > IMAG_TOLERANCE:
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has a significant imaginary component ({imag:.3g}): the "
                             "covariances are ill-conditioned; use more samples than feature dimensions or a "
                             "larger eps")
        root = root.real
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(root))


def frechet_distance_stats(a: GaussianStats, b: GaussianStats) -> float:
    """Fréchet distance between two streamed feature sets (same feature network, METHOD §13.2)."""
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ ({a.dim} vs {b.dim}); both sets must use the same network")
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())
