"""Faults with real processes: the launcher starts 2 ranks (gloo, two DeepSpeed engines each) on loopback.

Fault drills (`SYMEQ_FAULT`) inject a NaN or a gradient spike on one rank, kill a rank or hang it; a
SIGUSR1 to the launcher stands in for SLURM's pre-time-limit signal.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launcher.launch import Layout, layout_from_env, resolve_run_dir
from symeq_dist.runtime import checkpoint
from tests.conftest import ROOT, subprocess_env, tiny_overrides

pytestmark = pytest.mark.dist
CONFIG = str(ROOT / "configs" / "debug_cpu.yaml")


def launch(run_dir: Path, shards: Path, *extra: str, fault: str = "", grace: float = 5.0,
           background: bool = False) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    env = subprocess_env(SYMEQ_FAULT=fault)
    for key in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "SLURM_JOB_ID", "SLURM_PROCID"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "launcher", "--nproc-per-node", "2", "--grace", str(grace), CONFIG,
           *tiny_overrides(run_dir, shards, "fault.collective_timeout_s=15", *extra)]
    if background:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)


def weights(run_dir: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return checkpoint.read_weights(checkpoint.step_dir(run_dir, step))[name]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.mark.parametrize("fault, stage, extra", [
    ("nan:3:1", 0, ()),
    ("spike:3:1", 2, ("game.grad_spike=50", "game.grad_spike_warmup=2")),
    ("spike:3:0", 0, ("game.grad_spike=50", "game.grad_spike_warmup=2")),
    ("spike:3:1", 3, ("game.grad_spike=50", "game.grad_spike_warmup=2")),
    ("nan:3:1", 0, ("game.schedule=simultaneous",)),
], ids=["nan-zero0", "spike-zero2", "spike-zero0", "spike-zero3", "nan-simultaneous"])
def test_one_bad_rank_skips_both_players_on_all_ranks(tmp_path: Path, mnist_shards: Path, fault: str, stage: int,
                                                      extra: tuple[str, ...]) -> None:
    run = tmp_path / "run"
    proc = launch(run, mnist_shards, "checkpoint.every=1", "checkpoint.keep_last=10", "train.steps=5",
                  f"engines.encoder.zero_stage={stage}", f"engines.decoder.zero_stage={stage}", *extra, fault=fault)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the update is skipped on every rank" in proc.stderr
    for name in ("encoder", "decoder"):  # step 3 changed nothing, the steps around it did
        assert same(weights(run, 2, name), weights(run, 3, name)), f"{name} moved at the skipped step"
        assert not same(weights(run, 3, name), weights(run, 4, name))
        assert not same(weights(run, 1, name), weights(run, 2, name))
    skipped = scalars(run, "sys/skipped_steps")
    assert [skipped[s] for s in range(1, 6)] == [0, 0, 1, 1, 1]


def test_consecutive_skips_are_capped(tmp_path: Path, mnist_shards: Path) -> None:
    proc = launch(tmp_path / "run", mnist_shards, "train.steps=8", "game.max_consecutive_skips=2",
                  fault="nan:3:1,nan:4:0,nan:5:1")
    assert proc.returncode != 0
    assert "3 consecutive skipped steps" in proc.stderr and "game.max_consecutive_skips" in proc.stderr


@pytest.mark.parametrize("fault, code", [("kill:3:1", 128 + signal.SIGKILL), ("hang:3:1", 1)])
def test_a_dead_or_hung_rank_stops_the_job_in_bounded_time(tmp_path: Path, mnist_shards: Path, fault: str,
                                                           code: int) -> None:
    start = time.monotonic()
    proc = launch(tmp_path / "run", mnist_shards, "train.steps=8", fault=fault, grace=5)
    elapsed = time.monotonic() - start
    assert proc.returncode == code, proc.stderr[-3000:]
    assert elapsed < 15 + 5 + 30  # collective timeout + grace + start-up
    assert "symeq-launch: error: the run failed: rank" in proc.stderr
    assert "a collective operation failed" in proc.stderr and "Another rank died or hangs" in proc.stderr


def test_preemption_signal_checkpoints_and_the_rerun_finishes_like_an_uninterrupted_run(
        tmp_path: Path, mnist_shards: Path) -> None:
    extra = ("train.steps=120", "checkpoint.every=100000", "monitor.log_every=1000", "monitor.image_every=100000",
             "data.num_workers=1")
    full = launch(tmp_path / "full", mnist_shards, *extra)
    assert full.returncode == 0, full.stderr[-3000:]
    # only rank 1 is signalled (before step 50): both ranks must stop after that step and checkpoint
    cut = launch(tmp_path / "cut", mnist_shards, *extra, fault="usr1:50:1")
    assert cut.returncode == 75, cut.stderr[-3000:]
    assert checkpoint.load_meta(tmp_path / "cut")["step"] == 50
    assert "SIGUSR1 received: checkpoint at step 50 written" in cut.stderr
    assert "a preemption signal on another rank" in cut.stderr  # rank 0 stopped because rank 1 was signalled
    assert (tmp_path / "cut" / "PREEMPTED").read_text().strip() == "50"
    again = launch(tmp_path / "cut", mnist_shards, *extra)  # the same command: the launcher resumes
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming (resume=true)" in again.stderr and not (tmp_path / "cut" / "PREEMPTED").exists()
    for name in ("encoder", "decoder"):
        assert same(weights(tmp_path / "full", 120, name), weights(tmp_path / "cut", 120, name)), name


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2], ids=["USR1", "USR2"])
def test_launcher_forwards_a_real_signal(tmp_path: Path, mnist_shards: Path, signum: signal.Signals) -> None:
    """Every signal the launcher forwards is a preemption signal of the ranks (USR2 used to kill them)."""
    # TensorBoard's files appear with the first logged step (monitor.log_every=5): then the ranks are training
    proc = launch(tmp_path / "run", mnist_shards, "train.steps=100000", "checkpoint.every=100000",
                  "monitor.log_every=5", "monitor.image_every=100000", background=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "tb").is_dir() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    step = checkpoint.load_meta(tmp_path / "run")["step"]
    assert 0 < step < 100000 and f"{signum.name} received: checkpoint at step {step} written" in out


def test_slurm_environment_is_read_once(tmp_path: Path) -> None:
    env = {"SLURM_JOB_ID": "123457", "SLURM_PROCID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_ON_NODE": "4", "MASTER_ADDR": "10.0.0.5"}
    assert layout_from_env(env, None) == Layout(2, 1, 4, "10.0.0.5", 20000 + 123457 % 10000, "123457")
    assert layout_from_env({**env, "SLURM_GPUS_ON_NODE": ""}, 2).world_size == 4
    with pytest.raises(SystemExit, match="--ntasks-per-node=1"):
        layout_from_env({**env, "SLURM_NTASKS": "8"}, None)
    assert layout_from_env({}, 3).nnodes == 1 and layout_from_env({}, 3).master_addr == "127.0.0.1"
    assert resolve_run_dir(CONFIG, [f"run_dir={tmp_path}/x-{{job_id}}"], "77") == tmp_path / "x-77"
    with pytest.raises(SystemExit, match="outside a SLURM job"):
        resolve_run_dir(CONFIG, ["run_dir=runs/{job_id}"], None)
