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


def test_ema_is_the_average_of_the_trajectory_and_resumes_exactly(tmp_path: Path, mnist_shards: Path) -> None:
    """train.ema_decay=0.5: weights.pt's "ema" is 0.5^t w_0 + sum 0.5^(t-s+1) w_s over the applied updates;
    a run stopped at step 2 and resumed has the same averages at step 4; sampling and eval load them."""
    from symeq_dist.models import build_players

    def run(name: str, *extra: str) -> Path:
        overrides = tiny_overrides(tmp_path / name, mnist_shards, "train.ema_decay=0.5", "checkpoint.every=1",
                                   "checkpoint.keep_last=10", *extra)
        run_training(load_config(None, overrides))
        return tmp_path / name

    full = run("full", "train.steps=4")
    cfg = load_config(None, tiny_overrides(full, mnist_shards))
    torch.manual_seed(cfg.seed)
    expected = {name: {k: v.clone() for k, v in module.state_dict().items()}
                for name, module in build_players(cfg.model).items()}
    for step in range(1, 5):
        trained = checkpoint.read_weights(checkpoint.step_dir(full, step))
        for name, state in expected.items():
            for key in state:
                state[key] = 0.5 * state[key] + 0.5 * trained[name][key]
        ema = trained["ema"]
        assert all(torch.allclose(ema[n][k], v, atol=1e-6) for n, s in expected.items() for k, v in s.items())
    run("cut", "train.steps=2")
    run("cut", "train.steps=4", "resume=true")
    resumed = checkpoint.read_weights(checkpoint.step_dir(tmp_path / "cut", 4))["ema"]
    final = checkpoint.read_weights(checkpoint.step_dir(full, 4))["ema"]
    assert all(torch.equal(resumed[n][k], v) for n, s in final.items() for k, v in s.items())
    model = load_trained(full)
    assert model.ema and torch.equal(model.decoder.state_dict()[next(iter(final["decoder"]))],
                                     next(iter(final["decoder"].values())))
    assert not load_trained(full, ema=False).ema
