"""The linear probe: how well a linear classifier reads the labels from the encoder's codes.

Pure numpy / torch: must not import tensorboard, deepspeed or any other symeq_dist module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

PROBE_WEIGHT_DECAY = 1e-4  # small L2 term: keeps the optimum finite on separable codes, so LBFGS converges


def _probe_inputs(z: Tensor, y: Tensor, num_classes: int, name: str) -> tuple[Tensor, Tensor]:
    z = torch.as_tensor(z).detach().to("cpu", torch.float64)
    y = torch.as_tensor(y).detach().to("cpu", torch.long).reshape(-1)
    if z.ndim != 2 or z.shape[0] != y.shape[0] or z.shape[0] < 2:
        raise ValueError(f"{name} codes must be (n >= 2, d) with one label each, got codes {tuple(z.shape)} and "
                         f"labels {tuple(y.shape)}; flatten the latents to one row per sample")
    if bool(((y < 0) | (y >= num_classes)).any()):
        raise ValueError(f"{name} labels must lie in [0, {num_classes}); pass the dataset's num_classes")
    return z, y


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the previous count (the probe, the FD classifier).

    Why: the probe's matrices are tiny, so on a shared or busy CPU the thread barriers cost 10x the arithmetic
    (measured: 100 ms vs 10 ms per LBFGS evaluation), and one thread fixes the reduction order, so the accuracy
    does not depend on the machine's core count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _fit_softmax(x: Tensor, y: Tensor, num_classes: int, *, epochs: int, lr: float, seed: int) -> tuple[Tensor, Tensor]:
    """Full-batch LBFGS on the L2-regularised softmax cross-entropy; returns (weight (d, K), bias (K,))."""
    gen = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(x.shape[1], num_classes, generator=gen, dtype=torch.float32)).requires_grad_()
    bias = torch.zeros(num_classes, dtype=torch.float32, requires_grad=True)
    # torch's default tolerances; strong-Wolfe line search makes the small initial step `lr` safe and fast
    optimizer = torch.optim.LBFGS([weight, bias], lr=lr, max_iter=epochs, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y)
        loss = loss + 0.5 * PROBE_WEIGHT_DECAY * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe_accuracy(train_z: Tensor, train_y: Tensor, test_z: Tensor, test_y: Tensor, *, num_classes: int,
                          epochs: int = 200, lr: float = 0.1, seed: int = 0) -> float:
    """Test accuracy of a multinomial logistic regression trained on frozen codes.

    Codes (bits as 0/1 floats, or reals) are standardised with the training mean/std; the classifier is fit
    full-batch with LBFGS (strong-Wolfe line search, `epochs` iterations at most, initial step `lr`) in float32
    on one CPU thread, with a seeded initialisation, so the result is deterministic under `seed`. A small L2
    term (1e-4) keeps the optimum finite on separable codes. The first call in a process also pays torch.optim's
    one-off import of torch._dynamo (about 1 s).

    Args:
        train_z, test_z: codes, shape (n, d). train_y, test_y: integer labels, shape (n,).
        num_classes: number of classes K (labels in [0, K)).

    Returns:
        Accuracy on the test codes, in [0, 1].
    """
    if num_classes < 2:
        raise ValueError(f"the probe needs num_classes >= 2, got {num_classes}")
    x_train, y_train = _probe_inputs(train_z, train_y, num_classes, "train")
    x_test, y_test = _probe_inputs(test_z, test_y, num_classes, "test")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"train and test codes differ in width ({x_train.shape[1]} vs {x_test.shape[1]})")
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)  # constant (dead) bits stay 0 after scaling
    # float32 for the fit: the transposed float64 matmul of the backward pass is 4x slower on CPU
    x_train, x_test = ((x_train - mean) / std).float(), ((x_test - mean) / std).float()
    with single_thread():
        weight, bias = _fit_softmax(x_train, y_train, num_classes, epochs=epochs, lr=lr, seed=seed)
        predicted = (x_test @ weight + bias).argmax(1)
    return float((predicted == y_test).double().mean())
