"""A finished run exits 0: the process groups are destroyed and gloo's threads joined before the interpreter
finalizes (issue 10 #14: "terminate called without an active exception", SIGABRT, exit 134 after the last step).

The abort: a gloo worker thread that finishes a collective frees the work's tensors, which takes the GIL when
Python dropped a tensor first; a thread that waits for the GIL when finalization begins is ended with
pthread_exit, and unwinding it through gloo's destructors calls std::terminate. `dist.shutdown` (atexit) joins
those threads first, but only if nothing else keeps a process group alive (DeepSpeed's group cache, functions
imported after `init` with `group=WORLD` defaults, the engines' reference cycles).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, subprocess_env, tiny_overrides

pytestmark = [pytest.mark.dist, pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")]

# One process: train a tiny run with DeepSpeed imported after `init` (as `symeq train` does), shut down, and
# print the native threads left.
TRAIN_AND_SHUT_DOWN = """
import os, sys
from symeq_dist import api
from symeq_dist.runtime import dist
cfg = api.load_run_config(sys.argv[1], sys.argv[2:])
trainer = api.build_trainer(cfg, dist.init())
trainer.train()
trainer.close()
del trainer
dist.shutdown()
print("THREADS", sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")))
"""

# Rank 1 leaves a gloo all_reduce in flight at exit (rank 0 joins it 1.5 s later) and its last atexit handler
# holds the GIL in C for a few seconds: the worker that completes the all_reduce asks for the GIL just before the
# interpreter finalizes, unless `dist.shutdown` already joined it. Before the fix: SIGABRT on every run.
IN_FLIGHT_AT_EXIT = """
import atexit, os, sys, threading, time
if os.environ.get("RANK") == "1":
    atexit.register(sum, range(2 * 10**8))  # registered before anything else: runs last

def in_flight():
    import torch
    import torch.distributed as tdist
    if not tdist.is_initialized():
        return
    if os.environ["RANK"] == "1":
        tdist.all_reduce(torch.ones(10), async_op=True)  # work and tensor dropped at once
    else:
        time.sleep(1.5)
        tdist.all_reduce(torch.ones(10))

threading._register_atexit(in_flight)  # runs before the atexit handlers
"""


def test_shutdown_joins_every_gloo_thread(tmp_path: Path, mnist_shards: Path) -> None:
    env = subprocess_env()
    cmd = [sys.executable, "-c", TRAIN_AND_SHUT_DOWN, str(ROOT / "configs" / "debug_cpu.yaml"),
           *tiny_overrides(tmp_path / "run", mnist_shards, "train.steps=2")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads = next(line for line in proc.stdout.splitlines() if line.startswith("THREADS"))
    assert "gloo" not in threads and "tcpstore" not in threads, threads  # pt_gloo_runloop, gloo_tcp_loop, ...


@pytest.mark.slow
def test_a_collective_in_flight_at_exit_does_not_abort_the_rank(tmp_path: Path, mnist_shards: Path) -> None:
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(IN_FLIGHT_AT_EXIT)
    env = subprocess_env(SYMEQ_FAULT="nan:3:1")
    env["PYTHONPATH"] = f"{inject}:{env['PYTHONPATH']}"
    for key in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "SLURM_JOB_ID", "SLURM_PROCID"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "launcher", "--nproc-per-node", "2", str(ROOT / "configs" / "debug_cpu.yaml"),
           *tiny_overrides(tmp_path / "run", mnist_shards, "game.schedule=simultaneous")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert "terminate called" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
