"""Fréchet distance against closed forms and an independent square root; streamed statistics; the linear probe."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import linalg
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from symeq_dist.datasets.mnist import MNIST_THRESHOLD_HINT, read_mnist_5k, stratified_split
from symeq_dist.eval.frechet import GaussianStats, frechet_distance, frechet_distance_stats
from symeq_dist.eval.probe import linear_probe_accuracy


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    g = rng.normal(size=(dim, dim))
    return g @ g.T / dim + 0.1 * np.eye(dim)


def _random_orthogonal(rng: np.random.Generator, dim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def _sym_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _brute_force_fd(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Tr sqrtm(s1 s2) = Tr sqrtm(s1^½ s2 s1^½): a symmetric PSD matrix, so eigh suffices."""
    half = _sym_sqrt(s1)
    eig = np.linalg.eigvalsh(half @ s2 @ half)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(np.clip(eig, 0.0, None)).sum())


def _closed_form(mu1: np.ndarray, a: np.ndarray, mu2: np.ndarray, b: np.ndarray) -> float:
    """FD of Gaussians whose covariances share eigenvectors, with eigenvalues a and b."""
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


def test_diagonal_covariances_match_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(_closed_form(mu1, a, mu2, b), rel=1e-9)


def test_commuting_covariances_match_closed_form() -> None:
    rng = np.random.default_rng(1)
    q = _random_orthogonal(rng, 12)
    a, b = rng.uniform(0.1, 3.0, 12), rng.uniform(0.1, 3.0, 12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_closed_form(mu1, a, mu2, b), rel=1e-8)


@pytest.mark.parametrize("dim", [5, 17, 64])
def test_random_spd_matches_independent_square_root(dim: int) -> None:
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_brute_force_fd(mu1, s1, mu2, s2), rel=1e-6)


def _few_sample_covariances(seed: int, dim: int, num_samples: int) -> tuple[np.ndarray, ...]:
    """Set 1: two samples (covariance u u^T, rank 1) with unit 0 dead; set 2: `num_samples` samples with unit 1 dead.

    Returns (mu1, s1, mu2, s2, u).
    """
    rng = np.random.default_rng(seed)
    u = rng.normal(size=dim)
    u[0] = 0.0
    b = rng.normal(size=(num_samples, dim))
    b[:, 1] = 0.0
    return rng.normal(size=dim), np.outer(u, u), b.mean(axis=0), np.cov(b, rowvar=False), u


@pytest.mark.parametrize(("seed", "dim", "num_samples", "naive_root"), [(0, 16, 40, "not finite"),
                                                                        (66, 5, 9, "finite but wrong")])
def test_singular_product_falls_back_to_eps(seed: int, dim: int, num_samples: int, naive_root: str) -> None:
    """FD from a handful of samples with dead units: scipy's sqrtm of the singular product s1 s2 is NaN or finite
    garbage, so the result must come from the eps fallback (a case that passes without it tests nothing)."""
    mu1, s1, mu2, s2, u = _few_sample_covariances(seed, dim, num_samples)
    diff = mu1 - mu2
    exact = float(diff @ diff + u @ u + np.trace(s2) - 2.0 * np.sqrt(u @ s2 @ u))  # Tr sqrtm(u u^T s2) = sqrt(u^T s2 u)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(s1 @ s2)
    premise = "scipy's sqrtm now handles this product: choose a case it cannot, or this test covers no fallback"
    if naive_root == "not finite":
        assert not np.isfinite(root).all(), premise
    else:
        naive = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(root).real)
        assert np.isfinite(root).all() and abs(naive - exact) > 1.0, premise
    eps = 1e-6
    value = frechet_distance(mu1, s1, mu2, s2, eps=eps)
    offset = eps * np.eye(dim)
    # the documented result: the distance between the offset Gaussians (independent symmetric square root)
    assert value == pytest.approx(_brute_force_fd(mu1, s1 + offset, mu2, s2 + offset), rel=1e-8)
    # which the offset moves off the exact distance by O(sqrt(eps)) per direction null in one covariance only
    assert value == pytest.approx(exact, abs=2.0 * dim * np.sqrt(eps * (np.trace(s1) + np.trace(s2))))


def test_significant_imaginary_part_raises() -> None:
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_shape_mismatch_names_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


def test_streamed_stats_match_numpy_in_uneven_chunks() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 2048)) * rng.uniform(0.5, 2.0, 2048) + 5.0  # an offset mean stresses cancellation
    stats = GaussianStats(2048)
    start = 0
    for size in (1, 999, 7, 1500, 493):
        chunk = x[start:start + size]
        stats.update(torch.from_numpy(chunk) if size == 999 else chunk)
        start += size
    assert stats.count == 3000
    ref_mean, ref_cov = x.mean(axis=0), np.cov(x, rowvar=False)
    assert np.abs(stats.mean() - ref_mean).max() <= 1e-9 * np.abs(ref_mean).max()
    assert np.abs(stats.cov() - ref_cov).max() <= 1e-9 * np.abs(ref_cov).max()


def test_stats_distance_is_zero_to_itself_and_symmetric() -> None:
    rng = np.random.default_rng(3)
    a, b = GaussianStats(48), GaussianStats(48)
    a.update(rng.normal(size=(600, 48)).astype(np.float32))
    b.update(torch.randn(700, 48, generator=torch.Generator().manual_seed(3)) * 1.3 + 0.2)
    assert abs(frechet_distance_stats(a, a)) < 1e-6
    assert frechet_distance_stats(a, b) == pytest.approx(frechet_distance_stats(b, a), rel=1e-9)
    assert frechet_distance_stats(a, b) > 1.0


def test_empirical_distance_approaches_closed_form() -> None:
    rng = np.random.default_rng(4)
    mu1, mu2 = np.zeros(4), np.array([1.0, -1.0, 0.5, 2.0])
    s1, s2 = _random_spd(rng, 4) * 2.0, _random_spd(rng, 4)
    a, b = GaussianStats(4), GaussianStats(4)
    a.update(rng.multivariate_normal(mu1, s1, size=20000))
    b.update(rng.multivariate_normal(mu2, s2, size=20000))
    assert frechet_distance_stats(a, b) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=0.05)


def test_stats_reject_bad_input() -> None:
    stats = GaussianStats(4)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        stats.update(np.zeros((3, 5)))
    stats.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        stats.cov()
    with pytest.raises(ValueError, match="same network"):
        frechet_distance_stats(GaussianStats(3), stats)


# ---------------------------------------------------------------------------------------------------------------
# probe
# ---------------------------------------------------------------------------------------------------------------

def _clustered_bits(n: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary 130-d codes: each of 10 classes flips bits around its own random centre."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, 130, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, 10, (n,), generator=gen)
    z = (centres[y] + noise * torch.randn(n, 130, generator=gen) > 0).float()
    return z, y


def test_probe_separates_clustered_codes() -> None:
    train_z, train_y = _clustered_bits(2000, 1.5, seed=0)
    test_z, test_y = _clustered_bits(500, 1.5, seed=1)
    assert linear_probe_accuracy(train_z, train_y, test_z, test_y, num_classes=10) > 0.95


def test_probe_on_random_labels_is_near_chance() -> None:
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(3000, 20, generator=gen)
    y = torch.randint(0, 10, (3000,), generator=gen)
    accuracy = linear_probe_accuracy(z[:2000], y[:2000], z[2000:], y[2000:], num_classes=10)
    assert abs(accuracy - 0.1) < 0.05


def test_probe_is_deterministic() -> None:
    z, y = _clustered_bits(5000, 6.0, seed=2)  # overlapping classes: the optimiser has real work to do
    first = linear_probe_accuracy(z[:4500], y[:4500], z[4500:], y[4500:], num_classes=10, seed=3)
    assert first == linear_probe_accuracy(z[:4500], y[:4500], z[4500:], y[4500:], num_classes=10, seed=3)
    assert 0.2 < first < 1.0


def _mnist_bits(num_train: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Real MNIST digits binarised at the shards' threshold as 784-d 0/1 codes: `num_train` of the 4,500 train
    digits of the stratified split, and its 500 validation digits."""
    images, labels = read_mnist_5k()
    train, test = stratified_split(labels, seed=0, num_valid_per_class=50)
    bits = (images.reshape(len(images), -1) >= MNIST_THRESHOLD_HINT).astype(np.float64)
    return bits[train[:num_train]], labels[train[:num_train]], bits[test], labels[test]


def test_probe_reports_the_accuracy_of_its_objectives_optimum() -> None:
    """The documented objective (standardised codes, mean cross-entropy + 1e-4/2 ||W||^2) solved to 1e-10 by
    another solver (Newton-CG) predicts the same: the probe's number is the optimum's, whatever the seed.

    500 separable 784-d codes make the objective flat: an optimiser stopped early lands elsewhere."""
    train_z, train_y, test_z, test_y = _mnist_bits(500)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=1.0 / (1e-4 * len(train_y)), solver="newton-cg",
                                                                   tol=1e-10, max_iter=1000))
    expected = float((reference.fit(train_z, train_y).predict(test_z) == test_y).mean())
    codes = [torch.from_numpy(a) for a in (train_z, train_y, test_z, test_y)]
    accuracies = [linear_probe_accuracy(*codes, num_classes=10, seed=seed) for seed in (0, 1)]
    assert accuracies == [expected, expected]


def test_probe_with_one_class_in_train_predicts_it() -> None:
    z, y = _clustered_bits(200, 1.5, seed=4)
    accuracy = linear_probe_accuracy(z[:100], torch.full((100,), 3), z[100:], y[100:], num_classes=10)
    assert accuracy == float((y[100:] == 3).double().mean())


def test_probe_rejects_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        linear_probe_accuracy(torch.zeros(4, 3), torch.tensor([0, 1, 2, 5]), torch.zeros(2, 3), torch.tensor([0, 1]),
                              num_classes=3)
