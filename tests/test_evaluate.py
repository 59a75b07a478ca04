"""`symeq eval` and `symeq compare` end to end on a tiny trained run and a tiny feature classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from symeq_dist import api
from symeq_dist.api import train as run_training
from symeq_dist.cli import main
from symeq_dist.config import load_config
from symeq_dist.eval.features.classifier import train_classifier
from symeq_dist.eval.run import EvalOptions, evaluate
from symeq_dist.runtime import checkpoint, dist
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def classifier(mnist_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clf") / "classifier.pt"
    train_classifier(mnist_shards, out, epochs=1, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def runs(mnist_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for kind in ("symmetric", "elbo"):
        run_training(load_config(None, tiny_overrides(root / kind, mnist_shards, f"game.kind={kind}")))
        out[kind] = root / kind
    return out


def _opts(run_dir: Path, classifier: Path, **kw: object) -> EvalOptions:
    base = {"n": 120, "chain_steps": 3, "batch_size": 50, "tsne_points": 40, "progress": False}
    return EvalOptions(run_dir=run_dir, features=classifier, **{**base, **kw})  # type: ignore[arg-type]


def test_eval_report_is_complete_and_deterministic(runs: dict[str, Path], classifier: Path) -> None:
    run_dir = runs["symmetric"]
    first = evaluate(_opts(run_dir, classifier))
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["fd"] == first["fd"]
    (net,) = report["fd"]
    assert net.startswith("FD-clf-")
    assert set(report["fd"][net]) == {"random_code", "limiting_chain", "reconstruction"}
    assert all(v > 0 for v in report["fd"][net].values())
    assert report["consistency_gap"][net] == pytest.approx(
        report["fd"][net]["limiting_chain"] - report["fd"][net]["random_code"])
    assert report["fid_skipped"] and "--inception-weights" in report["fid_skipped"]
    assert report["mi"]["encoder"]["z"]["dims"] == 4 and "x" in report["mi"]["decoder"]
    assert 0 <= report["probe"]["accuracy"] <= 1 and 0 <= report["reconstruction_error"]["value"] <= 1
    assert (run_dir / "eval" / "tsne.png").is_file() and "FD-clf-" in (run_dir / "eval" / "report.md").read_text()
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert f"eval/{net}/limiting_chain" in acc.Tags()["scalars"] and "eval/tsne" in acc.Tags()["images"]
    second = evaluate(_opts(run_dir, classifier))
    assert second["fd"] == first["fd"] and second["probe"] == first["probe"] and second["mi"] == first["mi"]


def test_compare_puts_runs_side_by_side(runs: dict[str, Path], classifier: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    for run_dir in runs.values():
        evaluate(_opts(run_dir, classifier))
    assert main(["compare", str(runs["symmetric"]), str(runs["elbo"]), "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "symmetric" in table and "elbo" in table
    assert (tmp_path / "cmp.md").is_file() and (tmp_path / "cmp.png").is_file()


def test_eval_without_checkpoint_writes_nothing(tmp_path: Path, classifier: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint"):
        evaluate(_opts(tmp_path / "empty", classifier))
    assert not (tmp_path / "empty" / "eval").exists()


def test_eval_with_missing_or_wrong_inception_weights(runs: dict[str, Path], classifier: Path,
                                                      tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"pt_inception-2015-12-05-6726825d\.pth"):
        evaluate(_opts(runs["symmetric"], classifier, inception_weights=tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError):
        evaluate(_opts(runs["symmetric"], classifier, inception_weights=junk))


def test_eval_without_classifier_names_the_command(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="symeq eval train-features"):
        evaluate(_opts(runs["symmetric"], tmp_path / "none.pt"))


def test_eval_and_sample_use_the_accelerator_when_present(monkeypatch: pytest.MonkeyPatch, runs: dict[str, Path],
                                                          classifier: Path, tmp_path: Path) -> None:
    """`symeq eval` and `symeq sample` place the players on `dist.local_device()`: the GPU when CUDA is there
    (this machine has none: the choice is checked with torch.cuda.is_available patched, the runs on the CPU)."""
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dist.local_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.local_device() == torch.device("cuda", 1)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # the CPU fallback stays selectable
    assert dist.local_device() == torch.device("cpu")

    asked = []
    monkeypatch.setattr(dist, "local_device", lambda: asked.append(1) or torch.device("cpu"))
    api.sample(api.SampleRequest(run_dir=runs["symmetric"], mode="random", num=4, out=tmp_path / "g.png"))
    assert len(asked) == 1
    api.evaluate(_opts(runs["symmetric"], classifier, n=20))
    assert len(asked) == 2
