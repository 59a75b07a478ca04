"""Real two-process runs on loopback: torchrun, gloo, two DeepSpeed engines per process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from symeq_dist.api import SampleRequest, sample
from symeq_dist.config import model_config
from symeq_dist.models import build_players
from symeq_dist.runtime import checkpoint
from tests.conftest import ROOT, subprocess_env, tiny_overrides

pytestmark = pytest.mark.dist


def torchrun(nproc: int, overrides: list[str], timeout: int = 300,
             env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**subprocess_env(), **(env_extra or {})}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("MASTER_PORT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "dist_worker.py"), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("enc_stage, dec_stage, kind", [
    (2, 2, "symmetric"), (3, 3, "symmetric"), (3, 3, "elbo"),
    (0, 3, "symmetric"),  # the README's mixed example: a small encoder at ZeRO-0 beside a decoder at ZeRO-3
])
def test_two_ranks_keep_identical_parameters(tmp_path: Path, mnist_shards: Path, enc_stage: int, dec_stage: int,
                                             kind: str) -> None:
    run_dir = tmp_path / f"zero{enc_stage}{dec_stage}"
    overrides = tiny_overrides(run_dir, mnist_shards, f"engines.encoder.zero_stage={enc_stage}",
                               f"engines.decoder.zero_stage={dec_stage}", f"game.kind={kind}", "train.steps=4",
                               "checkpoint.every=4", "monitor.image_every=2")
    torchrun(2, overrides)
    ranks = [torch.load(run_dir / f"params_rank{r}.pt") for r in range(2)]
    engines = {"joint"} if kind == "elbo" else {"encoder", "decoder"}
    assert set(ranks[0]) == engines == set(ranks[1])
    for name in engines:
        assert ranks[0][name].keys() == ranks[1][name].keys()
        for key, value in ranks[0][name].items():
            assert value.numel() > 0, f"{name}.{key} is an empty (partitioned) tensor"
            assert torch.equal(value, ranks[1][name][key]), f"{name}.{key} differs across ranks"
    # the consolidated checkpoint (zero_to_fp32 at ZeRO-3) holds the weights the live engines hold
    encoder, decoder = build_players(model_config(kind="mlp", hidden=32, num_latents=4))
    assert checkpoint.load_weights(run_dir, encoder, decoder) == (4, False)
    live = ranks[0]["joint"] if kind == "elbo" else {f"decoder.{k}": v for k, v in ranks[0]["decoder"].items()}
    for key, value in decoder.state_dict().items():
        assert torch.equal(value, live[f"decoder.{key}"].float()), key
    req = SampleRequest(run_dir=run_dir, mode="limiting", steps=3, num=4, out=tmp_path / "g.png")
    assert sample(req).path.is_file()


@pytest.mark.parametrize("nproc", [1, 2])
def test_host_syncs_are_one_per_engine_step_and_one_per_log(tmp_path: Path, mnist_shards: Path, nproc: int) -> None:
    """The trainer's own host syncs (value reads a GPU would wait for): the finite-loss agreement before each
    engine's step, which at world size 2 also carries the preemption flags, and the stacked scalar all-reduce of
    each logging step; nothing else (no per-step preemption all-reduce, no `.item()` in monitors)."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, mnist_shards, "train.steps=14", "monitor.log_every=5",
                               "monitor.image_every=1000", "checkpoint.every=1000")
    torchrun(nproc, overrides, env_extra={"SYMEQ_TEST_COUNT_SYNCS": "3"})  # steps 4-14: logs at 5, 10 and 14
    for rank in range(nproc):
        ours = {k: v for k, v in json.loads((run_dir / f"syncs_rank{rank}.json").read_text()).items()
                if k.startswith("symeq_dist/")}
        assert sum(ours.values()) == 2 * 11 + 3, ours
        assert sum(v for k, v in ours.items() if k.startswith("symeq_dist/train/trainer.py")) == 2 * 11, ours


def test_two_ranks_resume_bitwise(tmp_path: Path, mnist_shards: Path) -> None:
    """2 ranks x 1 data worker: stopped at step 3 and resumed, the run ends with the uninterrupted run's weights."""
    extra = ("data.num_workers=1", "checkpoint.every=3", "monitor.image_every=100")
    torchrun(2, tiny_overrides(tmp_path / "full", mnist_shards, *extra, "train.steps=6"))
    torchrun(2, tiny_overrides(tmp_path / "cut", mnist_shards, *extra, "train.steps=3"))
    torchrun(2, tiny_overrides(tmp_path / "cut", mnist_shards, *extra, "train.steps=6", "resume=true"))
    for rank in range(2):
        full, resumed = (torch.load(tmp_path / d / f"params_rank{rank}.pt") for d in ("full", "cut"))
        for name in ("encoder", "decoder"):
            for key, value in full[name].items():
                assert torch.equal(value, resumed[name][key]), f"rank {rank}: {name}.{key} differs after resume"
    for rank in range(2):
        full, resumed = (torch.load(tmp_path / d / "checkpoints" / "step_00000006" / f"rank_{rank:05d}.pt",
                                    weights_only=False)["stream"] for d in ("full", "cut"))
        assert full == resumed and (full["batches"], full["world_size"], full["num_workers"]) == (6, 2, 1)


def test_an_iteration_is_the_single_device_update_at_the_global_batch(tmp_path: Path) -> None:
    """2 ranks with 8 samples each give each player the gradient of 1 rank with all 16 (same complete pairs):
    each engine all-reduces (averages) its own player's gradients."""
    for nproc in (1, 2):
        env = subprocess_env()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "tests" / "grad_worker.py"), str(tmp_path / f"grads{nproc}.pt")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = (torch.load(tmp_path / f"grads{n}.pt") for n in (1, 2))
    assert one.keys() == two.keys() == {"encoder", "decoder"}
    for name in one:
        for key, value in one[name].items():
            scale = value.abs().max().item()
            assert scale > 0 and torch.allclose(two[name][key], value, rtol=1e-5, atol=1e-6 * scale), f"{name}.{key}"
