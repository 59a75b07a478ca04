"""What loading a checkpoint may and may not do: the project's own files never run pickled code, and sampling and
evaluation need only the consolidated weights."""

from __future__ import annotations

import pathlib
import shutil
from pathlib import Path

import pytest
import torch

from symeq_dist import api
from symeq_dist.api import train as run_training
from symeq_dist.config import load_config
from symeq_dist.eval.model import load_trained
from symeq_dist.runtime import checkpoint
from tests.conftest import tiny_overrides


class _Payload:
    """Unpickling this creates a file: a stand-in for code hidden in a checkpoint someone sent you."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return pathlib.Path.touch, (self.marker,)


def _trained(tmp_path: Path, shards: Path, *extra: str) -> Path:
    run = tmp_path / "run"
    run_training(load_config(None, tiny_overrides(run, shards, "train.steps=2", "checkpoint.every=2", *extra)))
    return run


def test_resume_never_unpickles_code_from_a_rank_file(tmp_path: Path, mnist_shards: Path) -> None:
    run = _trained(tmp_path, mnist_shards)
    rank_file = checkpoint.latest_dir(run) / "rank_00000.pt"
    state = torch.load(rank_file, weights_only=True)  # the real file holds tensors and plain types only
    marker = tmp_path / "pwned"
    torch.save({**state, "train": _Payload(marker)}, rank_file)
    resume = load_config(None, tiny_overrides(run, mnist_shards, "train.steps=4", "checkpoint.every=2",
                                              "resume=true"))
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot read .*rank_00000\.pt"):
        run_training(resume)
    assert not marker.exists()


def test_weights_file_is_the_engines_fp32_weights(tmp_path: Path, mnist_shards: Path) -> None:
    run = _trained(tmp_path, mnist_shards)
    weights = checkpoint.read_weights(checkpoint.latest_dir(run))
    assert sorted(weights) == ["decoder", "encoder"]
    model = load_trained(run)
    for name, module in model.players.items():
        own = module.state_dict()
        assert own.keys() == weights[name].keys()
        assert all(weights[name][k].dtype == torch.float32 and torch.equal(weights[name][k], own[k]) for k in own)


@pytest.mark.parametrize("kind", ["symmetric", "elbo"])
def test_sampling_needs_only_the_weights_file(tmp_path: Path, mnist_shards: Path, kind: str) -> None:
    """`symeq sample` / `symeq eval` read weights.pt and meta.json: no DeepSpeed engine file (they unpickle)."""
    run = _trained(tmp_path, mnist_shards, f"game.kind={kind}")
    target = checkpoint.latest_dir(run)
    for engine in checkpoint.load_meta(run)["engines"]:
        shutil.rmtree(target / engine)
    out = api.sample(api.SampleRequest(run_dir=run, mode="limiting", steps=2, num=4, out=tmp_path / "g.png"))
    assert out.path.is_file()
