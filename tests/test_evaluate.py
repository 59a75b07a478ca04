"""`symeq eval` and `symeq compare` end to end on a tiny trained run and a tiny feature classifier; on a fresh run
whose shards have no feature network yet (digits-seg: no class labels), `symeq eval` trains one first."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from symeq_dist import api
from symeq_dist.api import train as run_training
from symeq_dist.cli import main
from symeq_dist.config import load_config
from symeq_dist.datasets.digits_seg import write_digits_seg_shards
from symeq_dist.eval.features.classifier import train_classifier
from symeq_dist.eval.run import EvalOptions, evaluate, load_extractors
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


# ---------------------------------------------------------------- a fresh run: no feature network yet

SMALL_EVAL = ["--n", "40", "--chain-steps", "2", "--batch-size", "20", "--tsne-points", "20", "--epochs", "1"]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run on digits-seg canvases (28 x 28, masks, no class labels); its shards hold no classifier.pt."""
    root = tmp_path_factory.mktemp("seg_run")
    write_digits_seg_shards(root / "shards", canvas=28, num_train=192, num_valid=48, samples_per_shard=96)
    run_training(load_config(None, tiny_overrides(root / "run", root / "shards")))
    return root / "run"


def test_eval_trains_the_missing_feature_network(seg_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The new user's path: `symeq eval RUN` on shards without a feature network (and without class labels) trains
    one beside the shards, says so, and writes the report; the next evaluation reuses it."""
    shards = Path(load_config(seg_run / "config.yaml", []).data.shards)
    assert not (shards / "classifier.pt").exists()
    assert main(["eval", str(seg_run), *SMALL_EVAL]) == 0
    err = capsys.readouterr().err
    assert f"no feature network for {shards}: training one (1 epochs" in err, err[-3000:]
    assert str(shards / "classifier.pt") in err and "classes present in the mask" in err
    report = json.loads((seg_run / "eval" / "report.json").read_text())
    (net,) = report["fd"]
    sha = report["fd_networks"][net]["sha256"]
    assert net == f"FD-clf-{sha[:8]}" and report["fd_networks"][net]["target"] == "mask_classes"
    assert report["fd_networks"][net]["path"] == str(shards / "classifier.pt") and report["probe"] is None
    assert all(v > 0 for v in report["fd"][net].values())
    first_bytes = (shards / "classifier.pt").read_bytes()
    assert main(["eval", str(seg_run), *SMALL_EVAL]) == 0
    assert "training one" not in capsys.readouterr().err  # cached beside the shards
    again = json.loads((seg_run / "eval" / "report.json").read_text())
    assert list(again["fd"]) == [net] and again["fd_networks"][net]["sha256"] == sha
    assert (shards / "classifier.pt").read_bytes() == first_bytes


def test_eval_can_be_told_not_to_train(seg_run: Path, tmp_path: Path) -> None:
    """--no-train-features (EvalOptions.train_features=False) keeps the old error naming the command."""
    shards = Path(load_config(seg_run / "config.yaml", []).data.shards)
    copy = Path(shutil.copytree(shards, tmp_path / "shards", ignore=shutil.ignore_patterns("classifier.pt")))
    cfg = load_config(None, tiny_overrides(tmp_path / "run", copy))
    opts = EvalOptions(run_dir=seg_run, train_features=False)
    with pytest.raises(FileNotFoundError, match="symeq eval train-features"):
        load_extractors(opts, cfg, torch.device("cpu"))
    assert not (copy / "classifier.pt").exists()
    assert main(["eval", str(seg_run), "--features", str(tmp_path / "named.pt"), *SMALL_EVAL]) == 2  # named: no train
    assert not (tmp_path / "named.pt").exists()


def test_train_features_command_on_digits_seg(seg_run: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`symeq eval train-features` on shards without class labels trains on the classes present in the masks."""
    shards, out = Path(load_config(seg_run / "config.yaml", []).data.shards), tmp_path / "net.pt"
    assert main(["eval", "train-features", str(shards), "--features", str(out), "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "10 classes present in the mask" in printed, printed


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: a read-only directory cannot be made")
def test_eval_caches_the_feature_network_in_the_run_when_the_shards_are_read_only(seg_run: Path,
                                                                                  tmp_path: Path) -> None:
    shards = Path(load_config(seg_run / "config.yaml", []).data.shards)
    copy = Path(shutil.copytree(shards, tmp_path / "shards", ignore=shutil.ignore_patterns("classifier.pt")))
    cfg = load_config(None, tiny_overrides(tmp_path / "run", copy))
    copy.chmod(0o555)
    try:
        extractors, _ = load_extractors(EvalOptions(run_dir=tmp_path / "run", feature_epochs=1, progress=False), cfg,
                                        torch.device("cpu"))
    finally:
        copy.chmod(0o755)
    (network,) = extractors.values()
    assert network.path == str(tmp_path / "run" / "eval" / "classifier.pt")
