"""DeepSpeed's one JIT-compiled op on CPU machines, `deepspeed_shm_comm` (shared-memory collectives): where it
is built, and building it once at set-up (`python -m symeq_dist.runtime.ops`, run by `make setup`).

torch builds JIT ops under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions/<python>_<cuda>/: every
entry point (make, `.venv/bin/symeq`, torchrun, the launcher, SLURM jobs) finds it there as long as none of
them sets the variable differently. A start that would build it says so first (it takes 30-50 s).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch.utils.cpp_extension import _get_build_directory  # the directory torch's JIT loader uses

log = logging.getLogger(__name__)
SHM_OP = "deepspeed_shm_comm"


def shm_op_path() -> Path:
    """The compiled op as torch's JIT loader will look for it."""
    return Path(_get_build_directory(SHM_OP, verbose=False)) / f"{SHM_OP}.so"


def announce_build() -> None:
    """On the CPU accelerator: warn before DeepSpeed JIT-builds the op (silently, 30-50 s) on this start."""
    if os.environ.get("DS_ACCELERATOR") == "cpu" and not shm_op_path().is_file():
        log.warning("building DeepSpeed's CPU communication op %s once, now (30-50 s; needs gcc and ninja) into "
                    "%s; later starts load it. `make setup` builds it ahead.", SHM_OP, shm_op_path().parent)


def build() -> Path:
    """Build (or load) the op where every entry point finds it; returns its path."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        raise RuntimeError("this DeepSpeed accelerator has no shared-memory comm op to build")
    builder.load(verbose=False)
    return shm_op_path()


if __name__ == "__main__":
    announce_build()
    print(f"DeepSpeed op ready: {build()}")
