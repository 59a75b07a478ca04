"""`symeq eval` and `symeq compare` end to end on a tiny trained run and a tiny feature classifier; on a fresh run
whose shards have no feature network yet (digits-seg: no class labels), `symeq eval` trains one first."""

from __future__ import annotations

import json
import math
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
from symeq_dist.data import build_eval_batches, to_float
from symeq_dist.datasets.digits_seg import write_digits_seg_shards
from symeq_dist.errors import InputError
from symeq_dist.eval.diagnostics import Diagnostics, parse_chain_lengths, spread
from symeq_dist.eval.features.classifier import train_classifier
from symeq_dist.eval.likelihood import bits_per_dim
from symeq_dist.eval.model import load_trained
from symeq_dist.eval.run import EvalOptions, evaluate, load_extractors
from symeq_dist.models.distributions import Bernoulli, Categorical, Gaussian
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


def test_eval_reports_bits_per_dim_of_the_held_out_split(runs: dict[str, Path], classifier: Path) -> None:
    """bits/dim of at most n images of the eval split (eval/likelihood.py, checked against the exact log p(x) in
    test_exact), in the report, its markdown, TensorBoard and `symeq compare`; the IW bound is the tighter one."""
    run_dir = runs["elbo"]
    report = evaluate(_opts(run_dir, classifier, n=60, iw_samples=4))["bits_per_dim"]
    assert report["split"] == "valid" and report["num_images"] == 60 and report["num_samples"] == 4
    assert report["discrete"] and 0 < report["iw_bpd"] <= report["elbo_bpd"] < 8
    model = load_trained(run_dir)
    cfg = model.cfg
    xs = torch.cat([to_float(b["image"], cfg.data) for b in build_eval_batches(cfg.data, split="valid",
                                                                                batch_size=50)])[:60]
    again = bits_per_dim(model.encoder, model.decoder, model.prior, [xs], num_samples=4,
                         generator=torch.Generator().manual_seed(99))
    assert again["elbo_bpd"] == pytest.approx(report["elbo_bpd"], rel=0.05)  # other draws of z: close, not equal
    assert "## Bits per dimension" in (run_dir / "eval" / "report.md").read_text()
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert {"eval/elbo_bpd", "eval/iw_bpd"} <= set(acc.Tags()["scalars"])


def test_eval_of_a_step_with_several_chain_lengths(runs: dict[str, Path], classifier: Path) -> None:
    """--step N evaluates that checkpoint (report in eval/step_<N>/, copied to eval/); a list of chain lengths is
    one pass over the chain whose last length gives exactly the number a single length gives."""
    run_dir = runs["symmetric"]
    several = evaluate(_opts(run_dir, classifier, step=3, chain_steps=(3, 0, 2)))
    step_dir = run_dir / "eval" / "step_00000003"
    report = json.loads((step_dir / "report.json").read_text())
    assert report["step"] == several["step"] == 3 and report["chain_lengths"] == [0, 2, 3]
    assert report == json.loads((run_dir / "eval" / "report.json").read_text())  # the most recent evaluation
    assert (step_dir / "tsne.png").is_file() and "limiting_chain@2" in (step_dir / "report.md").read_text()
    (net,) = report["fd"]
    fd = report["fd"][net]
    assert set(fd) == {"random_code", "limiting_chain", "reconstruction", "limiting_chain@0", "limiting_chain@2",
                       "limiting_chain@3"}
    assert fd["limiting_chain"] == fd["limiting_chain@3"]
    assert report["consistency_gap_by_length"][net] == pytest.approx(
        {k: fd[f"limiting_chain@{k}"] - fd["random_code"] for k in ("0", "2", "3")})
    single = evaluate(_opts(run_dir, classifier, step=3, chain_steps=3))
    assert single["fd"][net] == {k: fd[k] for k in ("random_code", "limiting_chain", "reconstruction")}
    assert single["chain_lengths"] == [3] and "consistency_gap_by_length" not in single
    latest = evaluate(_opts(run_dir, classifier))
    assert latest["step"] == 6 and latest["fd"][net]["random_code"] != fd["random_code"]
    assert json.loads((run_dir / "eval" / "report.json").read_text())["step"] == 6
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert {f"eval/{net}/gap@2", f"eval/{net}/limiting_chain@0", "eval/nll/encoder/z_gap",
            "eval/codes/chain@2/fd_to_prior"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars(f"eval/{net}/gap@2")] == [3]


def test_eval_uses_the_averages_unless_asked_for_the_trained_weights(mnist_shards: Path, classifier: Path,
                                                                     tmp_path: Path) -> None:
    run_training(load_config(None, tiny_overrides(tmp_path / "ema", mnist_shards, "train.ema_decay=0.5")))
    averaged = evaluate(_opts(tmp_path / "ema", classifier))
    trained = evaluate(_opts(tmp_path / "ema", classifier, ema=False))
    assert averaged["ema_weights"] is True and trained["ema_weights"] is False
    assert averaged["bits_per_dim"]["elbo_bpd"] != trained["bits_per_dim"]["elbo_bpd"]


def test_eval_of_a_missing_step_names_the_ones_there_are(runs: dict[str, Path], classifier: Path) -> None:
    before = sorted((runs["elbo"] / "eval").rglob("*")) if (runs["elbo"] / "eval").exists() else []
    with pytest.raises(checkpoint.CheckpointError, match=r"no complete checkpoint of step 4 \(it has \[3, 6\]\)"):
        evaluate(_opts(runs["elbo"], classifier, step=4))
    after = sorted((runs["elbo"] / "eval").rglob("*")) if (runs["elbo"] / "eval").exists() else []
    assert after == before


def test_eval_diagnostics_of_a_trained_run(runs: dict[str, Path], classifier: Path) -> None:
    """The report's diagnostics section: both players' NLL pairs, the posterior spread, the code drift per length."""
    results = evaluate(_opts(runs["elbo"], classifier, chain_steps=(0, 3)))
    diag = results["diagnostics"]
    assert set(diag["joint_nll"]["encoder"]) == {"z"} and set(diag["joint_nll"]["decoder"]) == {"x"}
    for row in (diag["joint_nll"]["encoder"]["z"], diag["joint_nll"]["decoder"]["x"]):
        assert row["gap"] == pytest.approx(row["dreams"] - row["data"]) and math.isfinite(row["gap"])
    assert diag["joint_nll"]["decoder"]["x"]["dims"] == 784 and diag["joint_nll"]["encoder"]["z"]["dims"] == 4
    assert diag["posterior"]["family"] == "gaussian" and diag["posterior"]["prior_variance"] == 1.0
    assert diag["posterior"]["data"]["variance"] > 0 and diag["posterior"]["dreams"]["variance"] > 0
    codes = diag["codes"]
    assert codes["latent"] == "z" and codes["dims"] == 4
    assert {"prior", "prior_resampled", "posterior_data", "posterior_dreams", "chain@0", "chain@3"} <= set(codes)
    assert "fd_to_prior" not in codes["prior"] and all(codes[s]["fd_to_prior"] >= 0 for s in ("chain@0", "chain@3"))
    md = (runs["elbo"] / "eval" / "report.md").read_text()
    assert "## Consistency diagnostics" in md and "| encoder | z | 4 |" in md and "| chain@3 |" in md


def test_eval_command_step_and_chain_list(runs: dict[str, Path], classifier: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", str(runs["elbo"]), "--n", "40", "--batch-size", "20", "--tsne-points", "20", "--features",
            str(classifier)]
    assert main([*args, "--step", "3", "--chain-steps", "0,2"]) == 0
    out = capsys.readouterr().out
    assert "limiting_chain@2" in out and f"wrote {runs['elbo'] / 'eval' / 'step_00000003'}" in out
    assert main([*args, "--chain-steps", "10,x"]) == 2
    assert "comma-separated list such as 0,10,100,1000" in capsys.readouterr().err


def test_compare_puts_runs_side_by_side(runs: dict[str, Path], classifier: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    for run_dir in runs.values():
        for step in (3, None):  # two evaluated steps: FD and gap against the training step
            evaluate(_opts(run_dir, classifier, step=step, chain_steps=(0, 3)))
    assert main(["compare", str(runs["symmetric"]), str(runs["elbo"]), "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "symmetric" in table and "elbo" in table
    assert (tmp_path / "cmp.md").is_file() and (tmp_path / "cmp.png").is_file()
    assert (tmp_path / "cmp_curves.png").is_file() and "## Across training" in table
    rows = [line for line in table.splitlines() if line.startswith(("| symmetric (", "| elbo ("))]
    assert [row.split(" | ")[1] for row in rows] == ["3", "6", "3", "6"], rows


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


# ---------------------------------------------------------------- the diagnostics' definitions on known joints

def _gaussian_pair(n: int, noise: float, q_scale: float, seed: int) -> dict[str, object]:
    """pi(z) = N(0, 1), p(x|z) = N(z, noise^2) and its exact posterior q(z|x) = N(x / (1 + noise^2),
    noise^2 / (1 + noise^2)), with the posterior's standard deviation scaled by q_scale (1: consistent)."""
    gen = torch.Generator().manual_seed(seed)
    shrink, post_sd = 1.0 / (1.0 + noise**2), noise / math.sqrt(1.0 + noise**2)

    def q(x: torch.Tensor) -> Gaussian:
        return Gaussian(x * shrink, torch.full_like(x, math.log(post_sd * q_scale)))

    z_dream = torch.randn(n, 1, generator=gen)
    x_dream = z_dream + noise * torch.randn(n, 1, generator=gen)
    x_data = math.sqrt(1.0 + noise**2) * torch.randn(n, 1, generator=gen)  # pi(x) = the decoder's marginal
    z_data = q(x_data).sample(gen)
    p_dream, p_data = Gaussian(z_dream, torch.tensor(math.log(noise))), Gaussian(z_data, torch.tensor(math.log(noise)))
    return {"dreams": (q(x_dream), z_dream, p_dream, x_dream), "data": (q(x_data), z_data, p_data, x_data)}


@pytest.mark.parametrize("q_scale", [1.0, 2.0])
def test_joint_nll_gap_is_zero_for_a_consistent_pair(q_scale: float) -> None:
    """gap = dreams - data vanishes (within Monte-Carlo error) when pi(x) q(z|x) = pi(z) p(x|z), and not when the
    encoder's standard deviation is off by a factor c = q_scale, where both gaps have closed forms."""
    noise, c = 0.5, q_scale
    diag = Diagnostics("z", "gaussian", 1)
    for where, (q, z, p, x) in _gaussian_pair(200_000, noise, c, seed=0).items():
        diag.add_nll("encoder", where, {"z": q}, {"z": z})
        diag.add_nll("decoder", where, {"x": p}, {"x": x})
        diag.add_posterior(where, q)
    table = diag.table()
    encoder, decoder = table["joint_nll"]["encoder"]["z"], table["joint_nll"]["decoder"]["x"]
    # -log q = const + (z - m(x))^2 / (2 c^2 s^2): (z - m)^2 has mean s^2 on dreams and c^2 s^2 on data
    assert encoder["gap"] == pytest.approx(0.5 / c**2 - 0.5, abs=0.01)
    # -log p = const + (x - z)^2 / (2 noise^2): E (x - z)^2 = noise^2 on dreams, noise^2 (noise^2 + c^2)/(1 + noise^2)
    # on data (x - m(x) and the encoder's noise c s are independent there)
    assert decoder["gap"] == pytest.approx(0.5 * (1 - (noise**2 + c**2) / (1 + noise**2)), abs=0.01)
    variance = noise**2 / (1 + noise**2) * c**2
    assert table["posterior"]["data"]["variance"] == pytest.approx(variance)
    assert table["posterior"]["data"]["entropy"] == pytest.approx(0.5 * math.log(2 * math.pi * math.e * variance))


def test_posterior_spread_and_code_drift() -> None:
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    variance, entropy = spread(Bernoulli(logits))
    reference = torch.distributions.Bernoulli(logits=logits)
    assert torch.allclose(variance, reference.variance) and torch.allclose(entropy, reference.entropy())
    assert spread(Categorical(torch.zeros(2, 3))) is None
    gen = torch.Generator().manual_seed(0)
    diag = Diagnostics("z", "gaussian", 8)
    diag.add_codes("prior", torch.randn(20_000, 8, generator=gen))
    diag.add_codes("prior_resampled", torch.randn(20_000, 8, generator=gen))
    diag.add_codes("chain@10", 0.5 + torch.randn(20_000, 8, generator=gen))  # every dim shifted by 0.5
    codes = diag.table()["codes"]
    assert codes["prior_resampled"]["fd_to_prior"] < 0.01
    assert codes["chain@10"]["fd_to_prior"] == pytest.approx(8 * 0.25, abs=0.03)
    assert codes["chain@10"]["mean"] == pytest.approx(0.5, abs=0.02)
    assert codes["chain@10"]["variance"] == pytest.approx(1.0, abs=0.03)


def test_chain_lengths_are_parsed() -> None:
    assert parse_chain_lengths("1000") == (1000,) and parse_chain_lengths(7) == (7,)
    assert parse_chain_lengths("100, 0,10,100") == (0, 10, 100) and parse_chain_lengths([3, 1]) == (1, 3)
    for bad in ("", "-1", "1,a", []):
        with pytest.raises(InputError):
            parse_chain_lengths(bad)
