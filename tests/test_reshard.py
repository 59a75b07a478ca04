"""Resuming on another number of ranks (2 -> 1 -> 2): real torchrun processes, gloo, both DeepSpeed engines.

After every load the consolidated fp32 weights, the Adam moments of every parameter and the step counters
equal what was saved, bitwise; the chains are redistributed in the documented order (docs/resume.md).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from symeq_dist.api import train as run_training
from symeq_dist.config import ConfigError, load_config
from symeq_dist.runtime import checkpoint
from tests.conftest import ROOT, subprocess_env, tiny_overrides

pytestmark = pytest.mark.dist


def torchrun(nproc: int, phase: str, overrides: list[str]) -> subprocess.CompletedProcess[str]:
    env = subprocess_env()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "reshard_worker.py"), phase, *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _dump(run_dir: Path, name: str) -> dict[str, Any]:
    return torch.load(run_dir / f"{name}.pt", weights_only=False)


def assert_same_engines(saved: dict[str, Any], loaded: dict[str, Any], what: str) -> None:
    assert saved.keys() == loaded.keys()
    for name, old in saved.items():
        new = loaded[name]
        assert old["steps"] and new["steps"] == old["steps"], f"{what}: {name} optimizer step {new['steps']}"
        assert new["global_steps"] == old["global_steps"], f"{what}: {name} engine step"
        assert new["groups"] == old["groups"], f"{what}: {name} param groups (lr, betas, eps, weight decay)"
        assert new["params"].keys() == old["params"].keys()
        for param, tensors in old["params"].items():
            for key, value in tensors.items():
                assert torch.equal(new["params"][param][key], value), f"{what}: {name}.{param} {key} differs"


def _base(run_dir: Path, shards: Path, enc: int, dec: int, kind: str) -> list[str]:
    return tiny_overrides(run_dir, shards, f"engines.encoder.zero_stage={enc}", f"engines.decoder.zero_stage={dec}",
                          f"game.kind={kind}", "engines.encoder.lr=3e-4", "monitor.image_every=100",
                          "checkpoint.every=100")


@pytest.mark.parametrize("enc, dec, kind", [
    pytest.param(0, 2, "symmetric", id="zero0+zero2"),
    pytest.param(3, 3, "symmetric", id="zero3", marks=pytest.mark.slow),
    pytest.param(1, 1, "symmetric", id="zero1", marks=pytest.mark.slow),
    pytest.param(3, 3, "elbo", id="joint-zero3", marks=pytest.mark.slow),
])
def test_two_one_two_ranks_keep_weights_and_adam_state(tmp_path: Path, mnist_shards: Path, enc: int, dec: int,
                                                      kind: str) -> None:
    run = tmp_path / "run"
    base = _base(run, mnist_shards, enc, dec, kind)
    torchrun(2, "a", [*base, "train.steps=2"])
    resharded = torchrun(1, "b", [*base, "train.steps=4", "resume=true"])   # 2 -> 1, then 2 more steps on one rank
    assert "MPU is not provided" not in resharded.stderr  # DeepSpeed's tensor-parallel warning: we have none
    assert "read in this process (num_workers 0)" in resharded.stderr
    torchrun(2, "c", [*base, "train.steps=5", "resume=true"])   # 1 -> 2, then 1 more step on two ranks
    a = [_dump(run, f"a_saved_rank{r}") for r in range(2)]
    b_loaded, b_saved = _dump(run, "b_loaded_rank0"), _dump(run, "b_saved_rank0")
    assert_same_engines(a[0]["engines"], b_loaded["engines"], "2 -> 1")
    assert b_loaded["train"] == 2 and b_saved["train"] == 4
    assert torch.equal(b_loaded["chain"], torch.cat([a[0]["chain"], a[1]["chain"]]))  # 2 + 2 rows, rank order
    assert b_loaded["stream"]["batches"] == a[0]["stream"]["batches"]
    for rank in range(2):
        c_loaded = _dump(run, f"c_loaded_rank{rank}")
        assert_same_engines(b_saved["engines"], c_loaded["engines"], f"1 -> 2, rank {rank}")
        assert c_loaded["train"] == 4
        assert torch.equal(c_loaded["chain"], b_saved["chain"][2 * rank:2 * rank + 2])
    assert _dump(run, "c_saved_rank0")["train"] == 5


def test_reshard_rank_states_order() -> None:
    old = [{"train": {"step": 7}, "stream": {"batches": 7, "rank": r, "skipped": r + 1}, "mi": {"r": r},
            "chain": torch.full((2, 1, 2, 2), float(r)), "gens": {}, "torch_rng": torch.zeros(1)} for r in range(3)]
    rows = [checkpoint.reshard_rank_states(old, rank=r, world_size=2, num_chains=6)["chain"][:, 0, 0, 0].tolist()
            for r in range(2)]
    assert rows == [[0.0, 0.0, 1.0], [1.0, 2.0, 2.0]]
    one = checkpoint.reshard_rank_states(old, rank=3, world_size=4, num_chains=6)  # 1 row each: rows 3
    assert one["chain"][:, 0, 0, 0].tolist() == [1.0]
    assert (one["gens"], one["torch_rng"], one["mi"]) == (None, None, {"r": 0})
    assert one["stream"] == {**old[0]["stream"], "skipped": 0}  # new rank 0 carries all old ranks' skips
    assert checkpoint.reshard_rank_states(old, rank=0, world_size=4, num_chains=6)["stream"]["skipped"] == 1 + 2 + 3
    wrapped = checkpoint.reshard_rank_states(old[:1], rank=0, world_size=1, num_chains=6)  # fewer rows: cyclic
    assert wrapped["chain"].shape[0] == 6
    old[2]["train"] = {"step": 6}
    with pytest.raises(checkpoint.CheckpointError, match="disagree on the step"):
        checkpoint.reshard_rank_states(old, rank=0, world_size=1, num_chains=6)


def test_resume_on_one_rank_names_a_missing_or_broken_file(tmp_path: Path, mnist_shards: Path) -> None:
    run = tmp_path / "run"
    base = _base(run, mnist_shards, 0, 2, "symmetric")
    torchrun(2, "a", [*base, "train.steps=1"])
    step = checkpoint.latest_dir(run)
    assert step is not None
    resume = load_config(None, [*base, "train.steps=2", "resume=true"])
    other_stage = load_config(None, [*base, "train.steps=2", "resume=true", "engines.decoder.zero_stage=1"])
    with pytest.raises(ConfigError, match=r"engines\.decoder\.zero_stage: 2 -> 1: cannot change on resume"):
        run_training(other_stage)
    rank_file = step / "rank_00001.pt"
    shutil.move(rank_file, tmp_path / "rank_00001.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"rank_00001\.pt.*restore it, or point .*latest"):
        run_training(resume)
    rank_file.write_bytes((tmp_path / "rank_00001.pt").read_bytes()[:100])  # truncated
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot read .*rank_00001\.pt"):
        run_training(resume)
    shutil.move(tmp_path / "rank_00001.pt", rank_file)
    shard = step / "decoder" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"decoder lacks the ZeRO optimizer partitions of ranks \[1\]"):
        run_training(resume)


def _scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_skipped_sample_count_stays_global_across_a_reshard(tmp_path: Path, mnist_shards: Path) -> None:
    """data/skipped counts the bad samples of all ranks: 2 ranks for 3 steps, then 1 rank for 3 more, logs the
    same count at every step as 2 ranks for 6 steps (the global sample order, hence the bad samples met, does
    not depend on the number of ranks)."""
    shards = tmp_path / "shards"
    shutil.copytree(mnist_shards, shards)
    for path in sorted(shards.glob("mnist-train-*.tar"))[1::2]:  # every other train shard loses its block
        path.write_bytes(path.read_bytes()[:1000])
    common = ["data.bad_samples=skip", "train.batch_size=32", "checkpoint.every=3", "monitor.image_every=100"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    torchrun(2, "full", [*tiny_overrides(full, shards, *common), "train.steps=6"])
    torchrun(2, "a", [*tiny_overrides(cut, shards, *common), "train.steps=3"])
    torchrun(1, "b", [*tiny_overrides(cut, shards, *common), "train.steps=6", "resume=true"])
    expected, got = _scalars(full, "data/skipped"), _scalars(cut, "data/skipped")
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert 0 < expected[3] < expected[6]  # both halves of the run met bad samples
    assert [got[s] for s in range(1, 7)] == [expected[s] for s in range(1, 7)]
