"""DeepSpeed's one JIT-compiled op on CPU machines, `deepspeed_shm_comm` (shared-memory collectives): where it
is built, building it once at set-up (`python -m symeq_dist.runtime.ops`, run by `make setup`), and loading it
so that a killed process can never hang the next one.

torch builds JIT ops under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions/<python>_<cuda>/: every
entry point (make, `.venv/bin/symeq`, torchrun, the launcher, SLURM jobs) finds it there as long as none of
them sets the variable differently. A start that would build it says so first (it takes 30-50 s).

The stale-lock hang. Every load of the op, built or not, takes torch's `FileBaton`: it creates `<dir>/lock`,
holds it open while ninja runs, and removes it. A process killed in that window (SIGKILL, a CI timeout, a
machine restart) leaves the file behind, and every later load waits for it forever, silently (`make setup`
once hung a CI run for 90 minutes on such a file). `ensure_loaded` loads the op before DeepSpeed does, under
an flock the kernel drops when its holder dies, and first removes a lock that is stale: no process on this
host holds it open, and it is older than `STALE_AFTER_S` (a holder on another node of a shared file system is
invisible to /proc; the age guard covers it, as a build takes under a minute). DeepSpeed then finds the op in
its cache of loaded ops and takes no baton of its own.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

from torch.utils.cpp_extension import _get_build_directory  # the directory torch's JIT loader uses

log = logging.getLogger(__name__)
SHM_OP = "deepspeed_shm_comm"
STALE_AFTER_S = 120.0    # a lock no local process holds is stale after this long (a build takes 30-50 s)
GIVE_UP_AFTER_S = 900.0  # a lock a live process holds this long: stop with the file named


def shm_op_path() -> Path:
    """The compiled op as torch's JIT loader will look for it."""
    return Path(_get_build_directory(SHM_OP, verbose=False)) / f"{SHM_OP}.so"


def announce_build() -> None:
    """Warn before DeepSpeed JIT-builds the op (silently, 30-50 s) on this start."""
    if not shm_op_path().is_file():
        log.warning("building DeepSpeed's CPU communication op %s once, now (30-50 s; needs gcc and ninja) into "
                    "%s; later starts load it. `make setup` builds it ahead.", SHM_OP, shm_op_path().parent)


def lock_holders(lock: Path) -> list[int]:
    """PIDs of the processes on this host that hold `lock` open (those we may look at)."""
    target, pids = str(lock.resolve()), []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                pids.append(int(fd_dir.parent.name))
        except OSError:  # the process ended, or is not ours to inspect
            continue
    return pids


def clear_stale_lock(lock: Path, stale_after_s: float = STALE_AFTER_S, give_up_after_s: float = GIVE_UP_AFTER_S,
                     poll_s: float = 0.5) -> bool:
    """Wait until torch's baton file `lock` is gone or stale; remove it when stale. True when one was removed."""
    start = time.monotonic()
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        holders = lock_holders(lock)
        if not holders and age >= stale_after_s:
            log.warning("removing the stale lock %s (%.0f s old, held by no process): a process was killed "
                        "while loading DeepSpeed's op, and torch would wait for the file forever", lock, age)
            lock.unlink(missing_ok=True)
            return True
        waited = time.monotonic() - start
        if waited > give_up_after_s:
            who = f"held open by PID {', '.join(map(str, holders))}" if holders else "held by no process here"
            raise RuntimeError(f"waited {waited:.0f} s for torch's build lock {lock} ({who}). If no build of "
                               f"{SHM_OP} is running on any node, remove the file and start again.")
        time.sleep(poll_s)


def ensure_loaded() -> Path | None:
    """On the CPU accelerator: load (building if needed) the op into DeepSpeed's op cache, safe against the
    stale-lock hang; a no-op elsewhere (DS_ACCELERATOR=cpu, or DeepSpeed's own choice where it is unset).
    Returns the op's path, or None when not on the CPU accelerator."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return None
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        raise RuntimeError("this DeepSpeed accelerator has no shared-memory comm op to build")
    announce_build()
    build_dir = shm_op_path().parent
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f"{SHM_OP}.symeq-lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # one loader at a time per host (and per node on most shared FS)
        clear_stale_lock(build_dir / "lock")
        builder.load(verbose=False)
    return shm_op_path()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"DeepSpeed op ready: {ensure_loaded()}")
