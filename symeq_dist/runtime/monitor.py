"""TensorBoard and logging set-up: rank 0 writes, every other rank gets a no-op monitor.

Also saves image grids as PNG under <run_dir>/samples/. Must not import deepspeed.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter


def setup_logging(rank: int) -> None:
    """Rank 0 logs at INFO, other ranks at WARNING, all to stderr with the rank in the prefix."""
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = f"%(asctime)s [rank {rank}] %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def make_grid(images: Tensor, nrow: int | None = None, pad: int = 2) -> Tensor:
    """(N, C, H, W) in [0, 1] -> one (C, H', W') grid image."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = images[i].detach().float().cpu().clamp(0, 1)
    return grid


def save_png(grid: Tensor, path: Path, *, min_size: int = 480) -> None:
    """Write a (C, H, W) grid in [0, 1] as an 8-bit PNG (grey or RGB), enlarged by an integer factor
    (nearest neighbour) until it is at least `min_size` pixels wide, so 28x28 digits are visible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, -(-min_size // grid.shape[-1]))
    grid = grid.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    array = (grid.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array[0], mode="L") if array.shape[0] == 1 else Image.fromarray(array.transpose(1, 2, 0))
    image.save(path)


class Monitor:
    """Scalars, images and histograms to TensorBoard under <run_dir>/tb (rank 0 only).

    The event file is opened at the first write, so a run that fails to start leaves no tb/ behind. After a
    resume, `purge_after(step)` makes that first open drop the events at steps > `step` that the crashed or
    preempted run logged after its last checkpoint (TensorBoard would otherwise show those steps twice).
    Scalars are flushed at every write: a crash loses at most the current logging interval.
    """

    def __init__(self, run_dir: Path, *, enabled: bool) -> None:
        self.run_dir = Path(run_dir)
        self.tb_dir = self.run_dir / "tb"
        self.enabled = enabled
        self._writer: SummaryWriter | None = None
        self._purge_step: int | None = None

    def purge_after(self, step: int) -> None:
        """Resumed at `step`: events at later steps, from before the resume, are dropped."""
        self._purge_step = step + 1

    @property
    def writer(self) -> SummaryWriter | None:
        if self._writer is None and self.enabled:
            self._writer = SummaryWriter(str(self.tb_dir), purge_step=self._purge_step)
        return self._writer

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def image(self, tag: str, images: Tensor, step: int, *, save_as: str | None = None) -> None:
        """Log (N, C, H, W) images as one grid; optionally also save it as samples/<save_as>."""
        if self.writer is None:
            return
        grid = make_grid(images)
        self.writer.add_image(tag, grid, step)
        if save_as is not None:
            save_png(grid, self.run_dir / "samples" / save_as)

    def image_hwc(self, tag: str, image: np.ndarray, step: int) -> None:
        """Log an already rendered (H, W, 3) uint8 picture (figures)."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer, self.enabled = None, False
