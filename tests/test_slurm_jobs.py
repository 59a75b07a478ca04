"""Training jobs on the real local SLURM cluster (two emulated nodes), submitted with slurm/submit.

Every job runs slurm/train.sbatch: srun starts one launcher per node, each launcher one rank (gloo),
two DeepSpeed engines per rank. The cluster's nodes have no GPUs and 2 cores, so the GPU and CPU lines
of the script are overridden on the command line, as a user would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from symeq_dist.runtime import checkpoint
from tests.conftest import ROOT, tiny_overrides

if TYPE_CHECKING:
    from tests.slurm_cluster import Cluster

pytest_plugins = ("tests.slurm_cluster",)
pytestmark = [pytest.mark.slurm, pytest.mark.dist]
CONFIG = str(ROOT / "configs" / "debug_cpu.yaml")
SMALL_NODES = ["--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


def submit(cluster: Cluster, run_dir: Path, shards: Path, *extra: str, fault: str = "") -> int:
    overrides = [o for o in tiny_overrides(run_dir, shards, "fault.collective_timeout_s=20", *extra)
                 if not o.startswith("run_dir=")]
    env = {k: v for k, v in cluster.env.items()  # in-process tests of this session set the torch.distributed ones
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env = {**env, "SYMEQ_PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu",
           "GLOO_SOCKET_IFNAME": "lo", "SYMEQ_NPROC_PER_NODE": "1", "SYMEQ_FAULT": fault, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(ROOT / "slurm" / "submit"), "train", str(run_dir), CONFIG, *overrides, "--",
                           *SMALL_NODES], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().split(";")[0])


def output(run_dir: Path, job: int) -> str:
    path = run_dir / f"slurm-train-{job}.out"
    return path.read_text() if path.is_file() else ""


def weights(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return checkpoint.read_weights(checkpoint.latest_dir(run_dir))[name]


def test_two_node_job_trains_and_finishes(slurm_cluster: Cluster, tmp_path: Path, mnist_shards: Path) -> None:
    run = tmp_path / "run"
    job = submit(slurm_cluster, run, mnist_shards, "train.steps=20", "checkpoint.every=10")
    state = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=240)
    log = output(run, job)
    assert state == "COMPLETED", log[-4000:] + slurm_cluster.logs()
    assert "node 0/2, ranks 0..0 of 2" in log and "node 1/2, ranks 1..1 of 2" in log
    assert checkpoint.load_meta(run)["step"] == 20 and checkpoint.load_meta(run)["world_size"] == 2
    assert (run / "tb").is_dir() and slurm_cluster.exit_code(job) == 0
    # the eval script reaches `symeq eval` on that run (told not to train an FD classifier into the shared test
    # shards, it stops with the error naming the fix)
    env = {**slurm_cluster.env, "SYMEQ_PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([str(ROOT / "slurm" / "submit"), "eval", str(run), "--n", "16", "--no-train-features",
                           "--", *SMALL_NODES, "--nodes=1"], env=env, capture_output=True, text=True, timeout=60,
                          check=True)
    eval_job = int(proc.stdout.strip().split(";")[0])
    slurm_cluster.wait_for(eval_job, {"COMPLETED", "FAILED"}, timeout=120)
    log = (run / f"slurm-eval-{eval_job}.out").read_text()
    assert f"symeq: eval job {eval_job}" in log and "symeq eval train-features" in log, log[-3000:]


def test_signalled_job_checkpoints_requeues_and_matches_an_uninterrupted_job(
        slurm_cluster: Cluster, tmp_path: Path, mnist_shards: Path) -> None:
    extra = ("train.steps=1200", "checkpoint.every=100000", "monitor.log_every=500", "monitor.image_every=100000")
    full_job = submit(slurm_cluster, tmp_path / "full", mnist_shards, *extra)
    state = slurm_cluster.wait_for(full_job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    assert state == "COMPLETED", output(tmp_path / "full", full_job)[-4000:]
    cut_job = submit(slurm_cluster, tmp_path / "cut", mnist_shards, *extra)
    slurm_cluster.wait_for(cut_job, {"RUNNING"}, timeout=120)
    deadline = time.monotonic() + 120
    while "train stream" not in output(tmp_path / "cut", cut_job) and time.monotonic() < deadline:
        time.sleep(0.3)
    time.sleep(1)  # mid-run (about 100 steps in, measured)
    slurm_cluster.signal(cut_job, "USR1")  # what --signal=USR1@300 sends before the time limit
    slurm_cluster.wait_for(cut_job, {"PENDING"}, timeout=120)
    step = checkpoint.load_meta(tmp_path / "cut")["step"]
    assert 0 < step < 1200, output(tmp_path / "cut", cut_job)[-3000:]
    # the requeued job restarts by itself after cred_expire + 1 s (about 11 s here; forcing StartTime=now right
    # after the requeue makes slurmctld kill it: "Job credential revoked")
    state = slurm_cluster.wait_for(cut_job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    assert state == "COMPLETED", output(tmp_path / "cut", cut_job)[-4000:]
    log = output(tmp_path / "cut", cut_job)
    assert f"checkpoint at step {step} written on a signal; requeueing" in log
    assert "restart 1" in log and "resuming (resume=true)" in log
    assert checkpoint.load_meta(tmp_path / "cut")["step"] == 1200
    for name in ("encoder", "decoder"):
        full, cut = weights(tmp_path / "full", name), weights(tmp_path / "cut", name)
        assert all(torch.equal(full[k], cut[k]) for k in full), f"{name} differs from the uninterrupted job"


def test_killed_rank_fails_the_job_with_a_readable_error(slurm_cluster: Cluster, tmp_path: Path,
                                                         mnist_shards: Path) -> None:
    run = tmp_path / "run"
    start = time.monotonic()
    job = submit(slurm_cluster, run, mnist_shards, "train.steps=50", fault="kill:5:1")
    state = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=240)
    log = output(run, job)
    assert state == "FAILED", log[-4000:]
    assert time.monotonic() - start < 120
    assert "symeq-launch: error: the run failed: rank 1 was killed by SIGKILL" in log
    assert "rank 0: a collective operation failed" in log
    assert slurm_cluster.exit_code(job) not in (0, None)
    assert not os.path.exists(run / "PREEMPTED")


def test_preempted_job_checkpoints_is_requeued_and_matches_an_uninterrupted_job(
        slurm_cluster: Cluster, tmp_path: Path, mnist_shards: Path) -> None:
    """A job of the `high` partition needs both nodes: SLURM signals the running `low` job's ranks, they
    checkpoint within GraceTime, the job is requeued, and it later resumes and finishes."""
    extra = ("train.steps=1200", "checkpoint.every=100000", "monitor.log_every=500", "monitor.image_every=100000")
    full_job = submit(slurm_cluster, tmp_path / "full", mnist_shards, *extra)
    assert slurm_cluster.wait_for(full_job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300) == "COMPLETED"
    job = submit(slurm_cluster, tmp_path / "cut", mnist_shards, *extra)
    slurm_cluster.wait_for(job, {"RUNNING"}, timeout=120)
    deadline = time.monotonic() + 120
    while "train stream" not in output(tmp_path / "cut", job) and time.monotonic() < deadline:
        time.sleep(0.3)
    time.sleep(1)
    high = slurm_cluster.run("sbatch", "--parsable", "--partition=high", "--nodes=2", "--exclusive", "--time=2",
                             f"--output={tmp_path / 'high.out'}", "--wrap=sleep 1").stdout.strip()
    slurm_cluster.wait_for(int(high.split(";")[0]), {"COMPLETED"}, timeout=180)
    state = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    log = output(tmp_path / "cut", job)
    assert state == "COMPLETED", log[-4000:]
    # the ranks get the job's --signal (USR1: the cluster has preempt_send_user_signal) or else SIGTERM
    assert re.search(r"SIG(USR1|TERM) received: checkpoint at step \d+ written", log), log[-4000:]
    assert "restart 1" in log and "resuming (resume=true)" in log
    for name in ("encoder", "decoder"):
        full, cut = weights(tmp_path / "full", name), weights(tmp_path / "cut", name)
        assert all(torch.equal(full[k], cut[k]) for k in full), f"{name} differs from the uninterrupted job"


def test_two_node_prior_job_trains_and_a_signalled_one_resumes_to_the_same_weights(
        slurm_cluster: Cluster, tmp_path: Path) -> None:
    """slurm/submit prior: slurm/prior.sbatch -> launcher --prior -> `symeq prior train` (accelerate, gloo) on both
    nodes; a job signalled mid-run (scancel --signal=USR1) checkpoints, is requeued and ends with the weights of
    the uninterrupted job."""
    import numpy as np

    from symeq_dist.datasets.codes import write_code_set

    rng = np.random.default_rng(0)
    codes = tmp_path / "codes"
    write_code_set(codes, dataset="codes", meta={}, family="gaussian", samples_per_shard=200,
                   codes={s: rng.normal(size=(n, 4)).astype(np.float32) for s, n in (("train", 400), ("valid", 64))})
    env = {k: v for k, v in slurm_cluster.env.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env = {**env, "SYMEQ_PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo",
           "SYMEQ_NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1"}
    overrides = [f"data.shards={codes}", "model.hidden=16", "model.depth=1", "model.timesteps=20",
                 "model.sample_steps=5", "train.batch_size=16", "train.steps=1500", "monitor.log_every=500",
                 "monitor.eval_every=100000", "monitor.progress=false", "checkpoint.every=100000"]

    def submit_prior(run: Path) -> int:
        proc = subprocess.run([str(ROOT / "slurm" / "submit"), "prior", str(run),
                               str(ROOT / "configs" / "prior_diffusion.yaml"), *overrides, "--", *SMALL_NODES,
                               "--nodes=2"], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.strip().split(";")[0])

    def log(run: Path, job: int) -> str:
        path = run / f"slurm-prior-{job}.out"
        return path.read_text() if path.is_file() else ""

    full = submit_prior(tmp_path / "full")
    state = slurm_cluster.wait_for(full, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    assert state == "COMPLETED", log(tmp_path / "full", full)[-4000:] + slurm_cluster.logs()
    assert "node 0/2, ranks 0..0 of 2" in log(tmp_path / "full", full)
    meta = json.loads((checkpoint.latest_dir(tmp_path / "full") / "meta.json").read_text())
    assert meta["step"] == 1500 and meta["world_size"] == 2
    cut = tmp_path / "cut"
    job = submit_prior(cut)
    slurm_cluster.wait_for(job, {"RUNNING"}, timeout=120)
    deadline = time.monotonic() + 120
    while not (cut / "tb").is_dir() and time.monotonic() < deadline:  # training has started
        time.sleep(0.3)
    time.sleep(1)
    slurm_cluster.signal(job, "USR1")  # to the job step: srun forwards it to the launchers, they to the ranks
    state = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    text = log(cut, job)
    assert state == "COMPLETED", text[-4000:]
    assert re.search(r"SIGUSR1 received: checkpoint at step \d+ written", text), text[-4000:]
    assert "restart 1" in text and "resuming (resume=true)" in text
    ours, theirs = (torch.load(checkpoint.latest_dir(d) / "weights.pt", weights_only=True)
                    for d in (cut, tmp_path / "full"))
    for part in ("prior", "ema"):
        assert all(torch.equal(ours[part][k], theirs[part][k]) for k in ours[part]), f"{part} differs"
