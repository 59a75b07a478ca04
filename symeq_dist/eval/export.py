"""Sample sets on disk, in the forms other tools read (`symeq sample --format`): one PNG grid (to look at), a
folder of PNGs (pytorch-fid, clean-fid, torch-fidelity) or an .npz with `arr_0` uint8 (N, H, W, C) (the
convention of the OpenAI evaluation suites). Images are written as 8-bit: clamped to [0, 1], rounded to 1/255.

Must not import `train`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from symeq_dist.errors import InputError
from symeq_dist.runtime.monitor import make_grid, save_png

FORMATS = ("grid", "png-dir", "npz")


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) float in [0, 1] -> (N, H, W, C) uint8 (clamped, rounded)."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to("cpu").numpy().astype(np.uint8)
    return array.transpose(0, 2, 3, 1)


def write_samples(chunks: Iterable[Tensor], out: Path, fmt: str, nrow: int | None = None) -> int:
    """Write the images of `chunks` ((n, C, H, W) each) to `out` in format `fmt`; returns how many. `nrow`: images
    per grid row (default: a square grid).

    Raises:
        InputError: an unknown format, or an output path that does not fit it (an .npz needs a file name
            ending in .npz; a PNG folder must be empty or new).
    """
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if fmt == "npz" and out.suffix != ".npz":
        raise InputError(f"--out {out}: an npz sample set needs a file name ending in .npz")
    if fmt == "png-dir" and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} exists and is not an empty folder: give a new or empty folder for the PNGs")
    parts: list[np.ndarray] = []
    count = 0
    for images in chunks:
        if fmt == "png-dir":
            out.mkdir(parents=True, exist_ok=True)
            for image in to_uint8(images):
                Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out / f"{count:06d}.png")
                count += 1
        else:
            parts.append(images.detach().float().cpu() if fmt == "grid" else to_uint8(images))
            count += len(images)
    if fmt == "grid":
        import torch

        save_png(make_grid(torch.cat(parts), nrow=nrow), out)
    elif fmt == "npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.stem + ".tmp.npz")
        np.savez(tmp, arr_0=np.concatenate(parts))
        os.replace(tmp, out)
    return count
