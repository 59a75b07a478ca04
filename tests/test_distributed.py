"""Real two-process runs on loopback: torchrun, gloo, two DeepSpeed engines per process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from symeq_dist.cli import SampleArgs, run_sampling
from tests.conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.dist


def torchrun(nproc: int, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("MASTER_PORT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "dist_worker.py"), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_keep_identical_parameters(tmp_path: Path, mnist_shards: Path, stage: int) -> None:
    run_dir = tmp_path / f"zero{stage}"
    overrides = tiny_overrides(run_dir, mnist_shards, f"engines.encoder.zero_stage={stage}",
                               f"engines.decoder.zero_stage={stage}", "train.steps=4", "checkpoint.every=4",
                               "monitor.image_every=2")
    torchrun(2, overrides)
    ranks = [torch.load(run_dir / f"params_rank{r}.pt") for r in range(2)]
    initial = torch.load(run_dir / "params_rank0.pt")  # structure check below
    assert set(ranks[0]) == {"encoder", "decoder"} == set(initial)
    for player in ("encoder", "decoder"):
        assert ranks[0][player].keys() == ranks[1][player].keys()
        for key, value in ranks[0][player].items():
            assert value.numel() > 0, f"{player}.{key} is an empty (partitioned) tensor"
            assert torch.equal(value, ranks[1][player][key]), f"{player}.{key} differs across ranks"
    # the consolidated checkpoint (zero_to_fp32 at ZeRO-3) gives the same weights as the live engines
    from symeq_dist.config import ModelConfig
    from symeq_dist.models import build_players
    from symeq_dist import checkpoint
    encoder, decoder = build_players(ModelConfig(kind="mlp", hidden=32, num_latents=4))
    assert checkpoint.load_weights(run_dir, encoder, decoder) == 4
    for key, value in decoder.state_dict().items():
        assert torch.equal(value, ranks[0]["decoder"][key].float()), key
    assert run_sampling(SampleArgs(run_dir, "limiting", 3, 4, tmp_path / "g.png", 0)).is_file()
