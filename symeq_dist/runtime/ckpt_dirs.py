"""Where checkpoints live and how one becomes visible: step directories, the atomic `latest` pointer, pruning.

Shared by the game's checkpoints (`runtime.checkpoint`, DeepSpeed engines) and the prior trainer's
(`priors.trainer`, accelerate): a checkpoint directory is complete or invisible, since `latest` is replaced by an
atomic rename only after its every file (meta.json last) was written. Imports neither deepspeed nor accelerate.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from symeq_dist.errors import InputError

STEP_NAME = re.compile(r"step_\d{8}")


class CheckpointError(InputError):
    """A checkpoint is missing or does not fit this run; the message names the fix."""


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return ckpt_root(run_dir) / f"step_{step:08d}"


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def latest_dir(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    pointer = ckpt_root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes().decode("ascii").strip()
    except UnicodeDecodeError:
        name = ""
    if not STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer} does not name a checkpoint (it should hold e.g. 'step_00000500'); write "
                              f"the name of a complete step_* directory into it ({complete_steps(run_dir)})")
    target = ckpt_root(run_dir) / name
    if not (target / "meta.json").is_file():
        raise CheckpointError(f"{pointer} names {target}, which is incomplete; delete {pointer} to start "
                              "over or point it at an older step_* directory")
    return target


def complete_steps(run_dir: str | Path, before: Path | None = None) -> str:
    """'complete: step_A, step_B' (older than `before` when given), for messages that suggest one."""
    done = sorted(p.name for p in ckpt_root(run_dir).glob("step_*") if (p / "meta.json").is_file()
                  and (before is None or p.name < before.name))
    return f"complete: {', '.join(done)}" if done else "there is no other complete one"


def publish(run_dir: str | Path, target: Path, meta: bytes, keep_last: int) -> None:
    """Make the fully written `target` the latest checkpoint: meta.json (its completion mark), then `latest`, then
    drop all but the newest `keep_last` complete ones. Call on one process, after every file was written."""
    atomic_write(target / "meta.json", meta)
    atomic_write(ckpt_root(run_dir) / "latest", target.name.encode())
    done = sorted(p for p in ckpt_root(run_dir).glob("step_*") if (p / "meta.json").is_file())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
