"""Counting host syncs: the calls that copy a tensor's value to Python (`.item()`, `.tolist()`, `bool()`,
`float()`, `int()`), each a host-device synchronisation when the tensor is on a GPU. A diagnostic for
benchmarks and tests (`benchmarks/step_syncs.py`); on a CPU run it counts the calls that would sync on a GPU.

    with SyncCounter() as syncs:
        trainer.train(until=...)
    syncs.by_caller()  # {"symeq_dist/train/trainer.py:140": 200, "torch/optim/adam.py:...": ...}

Each call is attributed to the first frame outside torch's tensor internals. Must not import game or data.
"""

from __future__ import annotations

import collections
import sys
from typing import Any

import torch

METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")


class SyncCounter:
    """Patches the value-reading methods of torch.Tensor while active; not thread-safe, not for production runs."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> SyncCounter:
        for name in METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._wrap(original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

    def _wrap(self, original: Any) -> Any:
        calls = self.calls

        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.endswith("torch/_tensor.py"):
                frame = frame.f_back  # e.g. Tensor.__format__ -> item
            where = "?" if frame is None else f"{_short(frame.f_code.co_filename)}:{frame.f_lineno}"
            calls[where] += 1
            return original(tensor, *args, **kwargs)

        return counted

    def by_caller(self) -> dict[str, int]:
        return dict(self.calls.most_common())

    def total(self, prefix: str = "") -> int:
        """Calls from files whose short path starts with `prefix` ("symeq_dist/", "deepspeed/", "torch/")."""
        return sum(n for where, n in self.calls.items() if where.startswith(prefix))


def _short(path: str) -> str:
    """site-packages/deepspeed/runtime/engine.py -> deepspeed/runtime/engine.py; repo files from the package down."""
    for marker in ("site-packages/", "/symeq_dist/", "/benchmarks/", "/tests/"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail if marker == "site-packages/" else marker.strip("/") + "/" + tail
    return path
