"""Implicit priors (issue 13): latent shard sets, the accelerate prior trainer, and the game fed by prior samples.

Real parts: codes written as real tar shards and read back by the stream, prior runs trained by accelerate in
real processes (torchrun for two), game runs with DeepSpeed engines on gloo.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from symeq_dist.api import prior_codes, prior_sample
from symeq_dist.api import train as run_training
from symeq_dist.config import ConfigError, load_config
from symeq_dist.data import load_manifest
from symeq_dist.data.schema import BadSample, Sample, Schema, decode, encode
from symeq_dist.data.stream import iter_eval_batches
from symeq_dist.data.verify import verify_shards
from symeq_dist.datasets.codes import write_code_set
from symeq_dist.errors import InputError
from symeq_dist.eval.model import load_trained
from symeq_dist.eval.prior import evaluate, format_report
from tests.conftest import ROOT, subprocess_env, tiny_overrides

LATENTS = 4  # tiny_overrides' model.num_latents
PRIOR = ["model.kind=diffusion", "model.hidden=16", "model.depth=1", "model.timesteps=20", "model.sample_steps=5",
         "train.batch_size=16", "train.lr=1e-3", "train.ema_decay=0.9", "monitor.log_every=2", "monitor.eval_every=4",
         "monitor.eval_batches=1", "monitor.progress=false", "checkpoint.every=4"]


def _cli(*args: str, nproc: int = 0, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """`symeq ...` in a fresh process; nproc >= 1: under torchrun with that many processes."""
    env = subprocess_env()
    launch = [sys.executable, "-m", "symeq_dist.cli"] if not nproc else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
        "symeq_dist.cli"]
    proc = subprocess.run([*launch, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def codes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A latent shard set of 4-d Gaussian codes (two clusters), train 400 / valid 100."""
    rng = np.random.default_rng(0)
    data = {split: (rng.normal(size=(n, LATENTS)) * 0.3 + np.where(rng.random((n, 1)) < 0.5, -2.0, 2.0))
            .astype(np.float32) for split, n in (("train", 400), ("valid", 100))}
    out = tmp_path_factory.mktemp("codes") / "codes"
    write_code_set(out, dataset="codes", codes=data, family="gaussian", meta={"source": "test"},
                   samples_per_shard=150)
    return out


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory: pytest.TempPathFactory, codes: Path) -> Path:
    run = tmp_path_factory.mktemp("prior") / "run"
    _cli("prior", "train", str(ROOT / "configs" / "prior_diffusion.yaml"), f"run_dir={run}", f"data.shards={codes}",
         "train.steps=8", *PRIOR)
    return run


# ---------------------------------------------------------------- latent shard sets

def test_a_latent_shard_set_reads_back_verifies_and_is_not_rewritten(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = {"train": rng.normal(size=(70, 2, 3, 3)).astype(np.float32),
            "valid": rng.normal(size=(9, 2, 3, 3)).astype(np.float32)}
    out = tmp_path / "set"
    manifest = write_code_set(out, dataset="codes", codes=data, family="gaussian", meta={}, samples_per_shard=32)
    assert manifest["code"] == {"shape": [2, 3, 3], "family": "gaussian", "dtype": "float32"}
    assert manifest["image_shape"] is None and manifest["format_version"] == 4
    for split, array in data.items():
        read = torch.cat([b["code"] for b in iter_eval_batches(out, load_manifest(out), split=split, batch_size=16)])
        assert torch.equal(read, torch.from_numpy(array))
    assert verify_shards(out).ok
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    write_code_set(out, dataset="codes", codes=data, family="gaussian", meta={}, samples_per_shard=32)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps  # same plan: nothing rewritten
    data["train"][5] += 1.0  # other codes (another checkpoint): another plan, rewritten
    write_code_set(out, dataset="codes", codes=data, family="gaussian", meta={}, samples_per_shard=32)
    read = next(iter_eval_batches(out, load_manifest(out), split="train", batch_size=70))["code"]
    assert torch.equal(read, torch.from_numpy(data["train"]))


def test_bad_codes_are_refused_and_named() -> None:
    schema = Schema(image_shape=None, code_shape=(3,), code_family="bernoulli")
    with pytest.raises(InputError, match="other than 0 and 1"):
        encode(Sample(image=None, code=np.array([0, 0.5, 1], np.float32)), schema, "000001")
    with pytest.raises(InputError, match="non-finite"):
        encode(Sample(image=None, code=np.array([0, np.nan, 1], np.float32)), schema, "000001")
    with pytest.raises(InputError, match="has an image but"):
        encode(Sample(image=np.zeros((1, 2, 2), np.uint8), code=np.zeros(3, np.float32)), schema, "000001")
    group = encode(Sample(image=None, code=np.array([0, 1, 1], np.float32)), schema, "000001")
    wrong = encode(Sample(image=None, code=np.zeros(4, np.float32)),
                   Schema(image_shape=None, code_shape=(4,), code_family="gaussian"), "000002")
    assert decode({"code.npy": group["code.npy"]}, schema, "s.tar, key 000001")["code"].tolist() == [0, 1, 1]
    with pytest.raises(BadSample, match=r"s.tar, key 000002: code.npy: code must be float32 \(3,\)"):
        decode({"code.npy": wrong["code.npy"]}, schema, "s.tar, key 000002")
    with pytest.raises(InputError, match="needs an image_shape or a code_shape"):
        Schema(image_shape=None)


def test_codes_of_a_run_are_its_encoders_top_latent(tmp_path: Path, mnist_shards: Path) -> None:
    run = tmp_path / "run"
    run_training(load_config(None, tiny_overrides(run, mnist_shards, "train.steps=2", "checkpoint.every=2")))
    manifest = prior_codes(run, tmp_path / "both", seed=3, samples_per_shard=2000)
    assert sorted(manifest["splits"]) == ["train", "valid"]  # the run's data.split and data.eval_split
    assert manifest["code"] == {"shape": [LATENTS], "family": "gaussian", "dtype": "float32"}
    assert manifest["source_step"] == 2 and manifest["latent"] == "z"
    out = tmp_path / "valid"
    prior_codes(run, out, splits=["valid"], seed=3, samples_per_shard=2000)
    model = load_trained(run)
    images = next(iter_eval_batches(mnist_shards, load_manifest(mnist_shards), split="valid", batch_size=500))["image"]
    with torch.no_grad():  # the same clean images, batch and generator: the same draws z ~ q(z | x)
        z, q = model.encoder.sample((images >= 112).float(), model.decoder, torch.Generator().manual_seed(3))
    written = next(iter_eval_batches(out, load_manifest(out), split="valid", batch_size=500))["code"]
    assert torch.equal(written, z["z"]) and not torch.equal(written, q["z"].mean())


# ---------------------------------------------------------------- the prior trainer (accelerate)

def _weights(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step_{step:08d}" / "weights.pt", weights_only=True)


@pytest.mark.parametrize("nproc", [1, 2])
def test_prior_training_resumes_exactly(tmp_path: Path, codes: Path, nproc: int) -> None:
    config = str(ROOT / "configs" / "prior_diffusion.yaml")
    common = [f"data.shards={codes}", *PRIOR]
    _cli("prior", "train", config, f"run_dir={tmp_path / 'full'}", "train.steps=8", *common, nproc=nproc)
    _cli("prior", "train", config, f"run_dir={tmp_path / 'cut'}", "train.steps=4", *common, nproc=nproc)
    _cli("prior", "resume", str(tmp_path / "cut"), "train.steps=8", nproc=nproc)
    full, resumed = _weights(tmp_path / "full", 8), _weights(tmp_path / "cut", 8)
    for part in ("prior", "ema"):
        assert full[part].keys() == resumed[part].keys()
        for key, value in full[part].items():
            assert torch.equal(value, resumed[part][key]), f"{part}.{key} differs after resume"
    step4 = _weights(tmp_path / "cut", 4)["prior"]
    assert any(not torch.equal(value, step4[key]) for key, value in full["prior"].items())  # it trained on
    meta = json.loads((tmp_path / "full" / "checkpoints" / "step_00000008" / "meta.json").read_text())
    assert meta["world_size"] == nproc and meta["family"] == "gaussian" and meta["shape"] == [LATENTS]
    acc = EventAccumulator(str(tmp_path / "cut" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8]
    assert [e.step for e in acc.Scalars("eval/loss")] == [4, 8]


def test_a_prior_run_refuses_image_shards_and_changed_settings(tmp_path: Path, mnist_shards: Path,
                                                               prior_run: Path) -> None:
    from symeq_dist.priors.trainer import load_prior_config, train_prior

    with pytest.raises(InputError, match=r"holds images, not latent codes.*symeq prior codes"):
        train_prior(load_prior_config(ROOT / "configs" / "prior_diffusion.yaml",
                                      [f"run_dir={tmp_path / 'p'}", f"data.shards={mnist_shards}"]))
    with pytest.raises(ConfigError, match=r"model\.hidden: cannot change on resume"):
        train_prior(load_prior_config(None, [f"run_dir={prior_run}", "resume=true", "model.hidden=32"]))
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        train_prior(load_prior_config(ROOT / "configs" / "prior_diffusion.yaml", [f"run_dir={prior_run}"]))


def test_prior_sample_and_eval(tmp_path: Path, prior_run: Path, codes: Path) -> None:
    out = tmp_path / "samples"
    manifest = prior_sample(prior_run, out, num=50, samples_per_shard=20)
    assert manifest["splits"]["train"]["num_samples"] == 50 and manifest["code"]["shape"] == [LATENTS]
    again = prior_sample(prior_run, tmp_path / "again", num=50, samples_per_shard=20)
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in manifest["splits"]["train"]["shards"]]  # same seed, same bytes
    report = evaluate(prior_run, codes=None, split=None, num=100, seed=0, ema=True)
    assert report["n"] == 100 and report["split"] == "valid"
    for row in ("prior", "closed_form", "training_codes"):
        assert set(report[row]) == {"fd", "mean_abs_err", "std_abs_err"} and np.isfinite(report[row]["fd"])
    # the codes are two clusters at +-2: N(0, I) is far from them, the training codes are close
    assert report["training_codes"]["fd"] < report["closed_form"]["fd"] / 4
    assert "the training codes" in format_report(report)


# ---------------------------------------------------------------- the game fed by an implicit prior

def test_an_implicit_prior_must_match_the_top_latent_and_elbo_refuses_it(tmp_path: Path, mnist_shards: Path,
                                                                          prior_run: Path, codes: Path) -> None:
    for kind, where in (("model", f"prior.run={prior_run}"), ("shards", f"prior.shards={codes}")):
        cfg = load_config(None, tiny_overrides(tmp_path / kind, mnist_shards, f"prior.kind={kind}", where,
                                               "model.num_latents=6"))
        with pytest.raises(ConfigError, match=rf"prior.kind={kind}: .* draws gaussian codes of shape \(4,\), but the "
                                              r"decoder's top latent 'z' is gaussian with shape \(6,\)"):
            run_training(cfg)
    cfg = load_config(None, tiny_overrides(tmp_path / "bits", mnist_shards, "prior.kind=shards",
                                           f"prior.shards={codes}", "model.latent=bernoulli"))
    with pytest.raises(ConfigError, match=r"draws gaussian codes.*is bernoulli with shape"):
        run_training(cfg)
    with pytest.raises(ConfigError, match="ELBO game needs the density"):
        load_config(None, tiny_overrides(tmp_path / "e", mnist_shards, "prior.kind=shards", f"prior.shards={codes}",
                                         "game.kind=elbo"))
    with pytest.raises(ConfigError, match=r"prior\.run: set it"):
        load_config(None, ["prior.kind=model"])


def _game(run: Path, shards: Path, *extra: str) -> list[str]:
    return tiny_overrides(run, shards, "checkpoint.every=3", "monitor.image_every=100", *extra)


def _params(run: Path, rank: int = 0) -> dict:
    return torch.load(run / f"params_rank{rank}.pt")


@pytest.mark.dist
def test_a_shards_prior_resumes_exactly_on_two_ranks(tmp_path: Path, mnist_shards: Path, codes: Path) -> None:
    from tests.test_distributed import torchrun

    extra = ("prior.kind=shards", f"prior.shards={codes}", "prior.shuffle_buffer=50")
    torchrun(2, _game(tmp_path / "full", mnist_shards, *extra, "train.steps=6"))
    torchrun(2, _game(tmp_path / "cut", mnist_shards, *extra, "train.steps=3"))
    torchrun(2, _game(tmp_path / "cut", mnist_shards, *extra, "train.steps=6", "resume=true"))
    for rank in range(2):
        full, resumed = _params(tmp_path / "full", rank), _params(tmp_path / "cut", rank)
        for name in ("encoder", "decoder"):
            for key, value in full[name].items():
                assert torch.equal(value, resumed[name][key]), f"rank {rank}: {name}.{key} differs after resume"
        states = [torch.load(tmp_path / d / "checkpoints" / "step_00000006" / f"rank_{rank:05d}.pt",
                             weights_only=True)["prior"] for d in ("full", "cut")]
        assert states[0] == states[1] and states[0]["batches"] == 6 and states[0]["world_size"] == 2


@pytest.mark.dist
def test_zero3_players_train_with_a_model_prior_on_two_ranks(tmp_path: Path, mnist_shards: Path,
                                                             prior_run: Path) -> None:
    from tests.test_distributed import torchrun

    run = tmp_path / "z3"
    torchrun(2, _game(run, mnist_shards, "prior.kind=model", f"prior.run={prior_run}", "train.steps=3",
                      "engines.encoder.zero_stage=3", "engines.decoder.zero_stage=3"))
    ranks = [_params(run, r) for r in range(2)]
    for name in ("encoder", "decoder"):
        for key, value in ranks[0][name].items():
            assert value.numel() > 0 and torch.isfinite(value).all() and torch.equal(value, ranks[1][name][key])


def test_a_buffered_model_prior_resumes_exactly_mid_buffer(tmp_path: Path, mnist_shards: Path,
                                                           prior_run: Path) -> None:
    extra = ("prior.kind=model", f"prior.run={prior_run}", "prior.refresh_every=3", "data.num_workers=0")
    run_training(load_config(None, _game(tmp_path / "full", mnist_shards, *extra, "train.steps=5")))
    run_training(load_config(None, _game(tmp_path / "cut", mnist_shards, *extra, "train.steps=4",
                                         "checkpoint.every=4")))  # refills at steps 1 and 4: two batches left
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step_00000004" / "rank_00000.pt", weights_only=True)
    assert state["prior"]["buffer"].shape == (2 * 16, LATENTS)
    run_training(load_config(None, _game(tmp_path / "cut", mnist_shards, *extra, "train.steps=5", "resume=true")))
    full, resumed = (torch.load(tmp_path / d / "checkpoints" / "step_00000005" / "weights.pt", weights_only=True)
                     for d in ("full", "cut"))
    for name in ("encoder", "decoder"):
        for key, value in full[name].items():
            assert torch.equal(value, resumed[name][key]), f"{name}.{key} differs after resume"


def test_a_signalled_prior_run_checkpoints_exits_75_and_resumes_to_the_same_weights(tmp_path: Path,
                                                                                    codes: Path) -> None:
    """SIGUSR1 mid-run (what SLURM's --signal sends): the step finishes, a checkpoint is written, <run_dir>/PREEMPTED
    names its step, `symeq prior train` exits 75; resuming ends with the uninterrupted run's weights."""
    import signal
    import time

    config = str(ROOT / "configs" / "prior_diffusion.yaml")
    common = [f"data.shards={codes}", *PRIOR, "train.steps=3000", "checkpoint.every=100000", "monitor.log_every=1000"]
    _cli("prior", "train", config, f"run_dir={tmp_path / 'full'}", *common)
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "symeq_dist.cli", "prior", "train", config, f"run_dir={cut}",
                             *common], cwd=ROOT, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (cut / "tb").is_dir() and time.monotonic() < deadline:  # the trackers start just before step 1
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    step = int((cut / "PREEMPTED").read_text())
    assert 0 < step < 3000 and f"SIGUSR1 received: checkpoint at step {step} written" in err
    assert (cut / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    _cli("prior", "resume", str(cut))
    assert not (cut / "PREEMPTED").exists()
    full, resumed = _weights(tmp_path / "full", 3000), _weights(cut, 3000)
    for part in ("prior", "ema"):
        assert all(torch.equal(value, resumed[part][key]) for key, value in full[part].items()), part


def test_eval_reports_random_codes_from_the_prior_in_use(tmp_path: Path, mnist_shards: Path,
                                                         prior_run: Path, codes: Path) -> None:
    """A run trained with prior.kind=model is evaluated with that prior (no bits/dim: no density); `--prior` puts
    another prior under a closed-form run (the two-stage VAE) and writes beside, not over, the run's own report."""
    from symeq_dist.api import evaluate as run_eval
    from symeq_dist.eval.features.classifier import train_classifier
    from symeq_dist.eval.options import EvalOptions

    features = tmp_path / "clf.pt"
    train_classifier(mnist_shards, features, epochs=1, seed=0, progress=False)
    small = {"n": 40, "chain_steps": 2, "batch_size": 20, "tsne_points": 20, "progress": False, "features": features}
    run = tmp_path / "b"
    run_training(load_config(None, _game(run, mnist_shards, "prior.kind=model", f"prior.run={prior_run}",
                                         "train.steps=3")))
    report = run_eval(EvalOptions(run_dir=run, **small))
    assert report["prior"].startswith(f"prior run {prior_run}")
    assert "implicit prior" in report["bits_per_dim"]["skipped"]
    net = next(iter(report["fd"]))  # the FD-clf network's name
    assert np.isfinite(report["fd"][net]["random_code"])
    plain = tmp_path / "a"
    run_training(load_config(None, _game(plain, mnist_shards, "train.steps=3")))
    own = run_eval(EvalOptions(run_dir=plain, **small))
    swapped = run_eval(EvalOptions(run_dir=plain, prior=codes, **small))
    assert own["prior"] == "auto" and swapped["prior"].startswith(f"latent shards {codes}")
    assert (plain / "eval" / "step_00000003-prior-codes" / "report.json").is_file()
    assert json.loads((plain / "eval" / "report.json").read_text())["prior"] == "auto"  # the run's own, kept
    assert swapped["fd"][net]["random_code"] != own["fd"][net]["random_code"]
    # the chain and the reconstructions do not use pi: the same as with the run's own prior except the chain's start
    assert swapped["reconstruction_error"] == own["reconstruction_error"]


def test_prior_sample_steps_override_the_diffusion_priors_own(prior_run: Path, tmp_path: Path) -> None:
    from symeq_dist.config import PriorConfig
    from symeq_dist.priors import ModelPrior

    assert ModelPrior(prior_run).model.sample_steps == 5  # the prior run's model.sample_steps
    fewer = ModelPrior(prior_run, sample_steps=2)
    assert fewer.model.sample_steps == 2 and fewer.source.endswith("2 DDIM steps")
    gen = torch.Generator().manual_seed(0)
    assert not torch.equal(fewer.sample(8, gen, torch.device("cpu")),
                           ModelPrior(prior_run).sample(8, torch.Generator().manual_seed(0), torch.device("cpu")))
    with pytest.raises(ConfigError, match="more than the 20 noise levels"):
        ModelPrior(prior_run, sample_steps=21)
    with pytest.raises(ConfigError, match=r"prior\.sample_steps: applies to prior\.kind=model only"):
        PriorConfig(kind="shards", shards=str(tmp_path), sample_steps=3)
