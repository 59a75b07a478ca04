"""DeepSpeed's CPU op loads even when a killed process left torch's build lock behind (the stale-lock hang that
stopped `make setup` in CI for 90 minutes), waits for a live holder, and names the file when it gives up."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from symeq_dist.runtime.ops import clear_stale_lock, lock_holders, shm_op_path
from tests.conftest import ROOT, subprocess_env

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")

HOLD = ("import os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print('held', flush=True); "
        "time.sleep(60)")


def _stale(lock: Path, age_s: float) -> None:
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))


@pytest.fixture
def holder(tmp_path: Path):
    """A live process holding `lock` open, as torch's FileBaton does while ninja runs."""
    lock = tmp_path / "lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield lock, proc
    proc.kill()
    proc.wait()


def test_an_old_lock_nobody_holds_is_removed(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    _stale(lock, 600)
    assert lock_holders(lock) == []
    assert clear_stale_lock(lock) is True
    assert not lock.exists()
    assert clear_stale_lock(lock) is False  # no lock: nothing to wait for


def test_a_young_lock_is_waited_for_until_it_is_stale(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    _stale(lock, 0)
    t0 = time.monotonic()
    assert clear_stale_lock(lock, stale_after_s=1.0, poll_s=0.05) is True  # perhaps a build on another node
    assert time.monotonic() - t0 >= 0.9 and not lock.exists()


def test_a_lock_a_live_process_holds_is_never_removed(holder) -> None:
    lock, proc = holder
    os.utime(lock, (0, 0))  # however old it looks
    assert lock_holders(lock) == [proc.pid]
    with pytest.raises(RuntimeError, match=rf"build lock {lock}.*PID {proc.pid}.*remove the file"):
        clear_stale_lock(lock, stale_after_s=0.0, give_up_after_s=0.5, poll_s=0.05)
    assert lock.exists()


def test_a_killed_loader_does_not_hang_the_next_start() -> None:
    """The real op directory with torch's baton left by a killed process: `python -m symeq_dist.runtime.ops`
    (what `make setup` and every engine build run) still loads the op; plain torch would wait forever."""
    lock = shm_op_path().parent / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # fails only if a loader holds it right now: then rerun
    os.close(fd)
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    env = {**subprocess_env(), "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, "-m", "symeq_dist.runtime.ops"], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "removing the stale lock" in out.stderr and "DeepSpeed op ready" in out.stdout
    assert not lock.exists()
