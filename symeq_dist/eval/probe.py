"""The linear probe: how well a linear classifier reads the labels from the encoder's codes.

numpy / scikit-learn (imported on first use), torch only to take tensors; must not import tensorboard,
deepspeed or any other symeq_dist module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

PROBE_WEIGHT_DECAY = 1e-4  # L2 strength on the mean loss: keeps the optimum finite on separable codes
# lbfgs stops when every gradient entry of the mean objective is below PROBE_TOL. scikit-learn's default 1e-4
# stops short of the optimum (up to 33 of 500 MNIST-5k test predictions differ) and 1e-6 still does on
# small train sets; 1e-7 predicted like a Newton-CG 1e-10 solution on every input measured, 1e-8 is a decade of
# margin (docs/benchmarks.md, "Linear probe").
PROBE_TOL = 1e-8
PROBE_MAX_ITER = 5000  # a cap, not the stopping rule: the measured inputs needed 75-2214 iterations at PROBE_TOL


def _probe_inputs(z: Tensor | np.ndarray, y: Tensor | np.ndarray, num_classes: int,
                  name: str) -> tuple[np.ndarray, np.ndarray]:
    z = torch.as_tensor(z).detach().to("cpu", torch.float64).numpy()
    y = torch.as_tensor(y).detach().to("cpu", torch.long).reshape(-1).numpy()
    if z.ndim != 2 or z.shape[0] != y.shape[0] or z.shape[0] < 2:
        raise ValueError(f"{name} codes must be (n >= 2, d) with one label each, got codes {tuple(z.shape)} and "
                         f"labels {tuple(y.shape)}; flatten the latents to one row per sample")
    if bool(((y < 0) | (y >= num_classes)).any()):
        raise ValueError(f"{name} labels must lie in [0, {num_classes}); pass the dataset's num_classes")
    return z, y


def build_probe(num_train: int, *, seed: int = 0, tol: float = PROBE_TOL) -> Pipeline:
    """The probe's estimator: StandardScaler, then multinomial LogisticRegression (lbfgs, L2).

    C = 1 / (PROBE_WEIGHT_DECAY * num_train) turns scikit-learn's C * sum(loss) + ||W||^2 / 2 into
    mean(loss) + PROBE_WEIGHT_DECAY / 2 * ||W||^2 (bias not penalised), the objective of the probe
    before scikit-learn, whatever the size of the train split.
    """
    from sklearn.linear_model import LogisticRegression  # about 1 s: only `symeq eval` pays it
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = LogisticRegression(C=1.0 / (PROBE_WEIGHT_DECAY * num_train), solver="lbfgs", tol=tol,
                                    max_iter=PROBE_MAX_ITER, random_state=seed)
    return make_pipeline(StandardScaler(), classifier)


def linear_probe_accuracy(train_z: Tensor | np.ndarray, train_y: Tensor | np.ndarray, test_z: Tensor | np.ndarray,
                          test_y: Tensor | np.ndarray, *, num_classes: int, seed: int = 0) -> float:
    """Test accuracy of a multinomial logistic regression trained on frozen codes.

    Codes (bits as 0/1 floats, or reals) are standardised with the training mean/std (constant codes stay 0);
    scikit-learn's lbfgs minimises mean cross-entropy + 1e-4/2 ||W||^2 from zero weights until every gradient
    entry is below 1e-8, in float64 with BLAS/OpenMP on one thread: the accuracy is that of the objective's
    optimum, identical on every run and core count (more threads changed the weights, and on a shared
    2-core machine made the fit 9-55x slower). A train split with a single class predicts that class.
    scikit-learn warns (ConvergenceWarning) if PROBE_MAX_ITER iterations do not reach the tolerance.

    Args:
        train_z, test_z: codes, shape (n, d). train_y, test_y: integer labels, shape (n,).
        num_classes: number of classes K (labels in [0, K)).
        seed: passed to the estimator as random_state; lbfgs starts from zero weights, so it has no effect.

    Returns:
        Accuracy on the test codes, in [0, 1].

    Raises:
        ValueError: fewer than 2 classes, bad shapes, labels outside [0, num_classes), or widths differ.
    """
    if num_classes < 2:
        raise ValueError(f"the probe needs num_classes >= 2, got {num_classes}")
    x_train, y_train = _probe_inputs(train_z, train_y, num_classes, "train")
    x_test, y_test = _probe_inputs(test_z, test_y, num_classes, "test")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"train and test codes differ in width ({x_train.shape[1]} vs {x_test.shape[1]})")
    present = np.unique(y_train)
    if len(present) == 1:  # scikit-learn refuses one class; the optimum of the objective predicts it everywhere
        return float((y_test == present[0]).mean())
    with threadpool_limits(limits=1):
        probe = build_probe(len(y_train), seed=seed).fit(x_train, y_train)
        predicted = probe.predict(x_test)
    return float((predicted == y_test).mean())
