"""End-to-end runs in this process: real DeepSpeed engines (CPU, gloo), real shards, real TensorBoard files."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor

from symeq_dist import game
from symeq_dist.api import SampleRequest, build_trainer, sample
from symeq_dist.api import train as run_training
from symeq_dist.cli import main
from symeq_dist.config import ConfigError, load_config
from symeq_dist.data import DataError, build_eval_batches, pixel_marginal
from symeq_dist.eval.model import load_trained
from symeq_dist.models import build_players
from symeq_dist.priors import build_prior
from symeq_dist.runtime import checkpoint, dist
from symeq_dist.runtime.engines import begin_micro_batch, build_engines, consolidated_weights, discard_gradients
from symeq_dist.train.trainer import NonFiniteLoss
from tests.conftest import ROOT, subprocess_env, tiny_overrides

REQUIRED_SCALARS = ["train/decoder/loss", "train/encoder/loss", "perf/samples_per_s", "sys/skipped_steps"]
REQUIRED_IMAGES = ["samples/data", "samples/reconstruction", "samples/random_code", "samples/limiting_chain"]


def _events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _scalars(run_dir: Path, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in _events(run_dir).Scalars(tag)}


def _train(tmp_path: Path, shards: Path, name: str, *extra: str) -> dict[str, float]:
    return run_training(load_config(None, tiny_overrides(tmp_path / name, shards, *extra)))


def test_tensorboard_tags_are_written_and_read_back(tmp_path: Path, mnist_shards: Path) -> None:
    last = _train(tmp_path, mnist_shards, "run")
    acc = _events(tmp_path / "run")
    tags = acc.Tags()
    for tag in REQUIRED_SCALARS:
        assert tag in tags["scalars"], tag
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3, 4, 5, 6]
    mi_tags = {t for t in tags["scalars"] if "/mi/" in t}
    assert {"train/encoder/mi/z_mean", "train/encoder/mi/z_dead_frac", "train/decoder/mi/x_mean"} <= mi_tags
    assert set(REQUIRED_IMAGES) <= set(tags["images"])
    assert [e.step for e in acc.Images("samples/limiting_chain")] == [3, 6]
    assert last["train/decoder/loss"] == pytest.approx(acc.Scalars("train/decoder/loss")[-1].value, rel=1e-6)
    assert (tmp_path / "run" / "samples" / "random_code_00000006.png").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_resume_continues_bitwise(tmp_path: Path, mnist_shards: Path) -> None:
    """A run stopped at its step-3 checkpoint and resumed logs exactly the losses of an uninterrupted run."""
    extra = ("data.num_workers=1", "train.steps=6")
    _train(tmp_path, mnist_shards, "full", *extra)
    _train(tmp_path, mnist_shards, "part", "data.num_workers=1", "train.steps=3")
    assert checkpoint.latest_dir(tmp_path / "part").name == "step_00000003"
    _train(tmp_path, mnist_shards, "part", *extra, "resume=true")
    for tag in ("train/decoder/loss", "train/encoder/loss", "train/encoder/mi/z_mean"):
        full, resumed = _scalars(tmp_path / "full", tag), _scalars(tmp_path / "part", tag)
        assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)], tag  # bitwise equal floats
    assert len(list((tmp_path / "part" / "checkpoints").glob("step_*"))) == 2  # keep_last


def test_resume_refuses_a_changed_config(tmp_path: Path, mnist_shards: Path) -> None:
    _train(tmp_path, mnist_shards, "run", "train.steps=3")
    with pytest.raises(ConfigError, match=r"engines.decoder.lr: 0.0001 -> 0.002"):
        _train(tmp_path, mnist_shards, "run", "train.steps=6", "resume=true", "engines.decoder.lr=2e-3")
    with pytest.raises(ConfigError, match="already holds a checkpoint; pass resume=true"):
        _train(tmp_path, mnist_shards, "run", "train.steps=6")


def test_resume_without_checkpoint_is_an_error(tmp_path: Path, mnist_shards: Path) -> None:
    with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint"):
        _train(tmp_path, mnist_shards, "none", "resume=true")


@pytest.mark.parametrize("extra", [("game.schedule=simultaneous",), ("game.kind=elbo",),
                                   ("train.grad_accumulation=2",)])
def test_variants_train(tmp_path: Path, mnist_shards: Path, extra: tuple[str, ...]) -> None:
    last = _train(tmp_path, mnist_shards, "run", *extra)
    keys = ["train/joint/loss"] if "elbo" in extra[0] else ["train/decoder/loss", "train/encoder/loss"]
    assert all(math.isfinite(last[key]) for key in keys)  # logged and finite (nan and inf fail)
    assert "train/decoder/mi/x_mean" in last


@pytest.mark.parametrize("model", [("model.kind=mlp", "model.hidden=32", "model.num_latents=4"),
                                   ("model.kind=ladder", "model.num_z0=6", "model.num_z1=10", "model.trunk_width=16",
                                    "model.mlp_width=16")], ids=["mlp", "ladder"])
def test_accumulation_equals_the_full_batch(mnist_shards: Path, model: tuple[str, ...]) -> None:
    """Real engines and the game's losses on the same complete pairs: 2 accumulated micro-batches of 8 give
    the gradient of one batch of 16 (a loss is a per-sample mean; each engine divides by the accumulation)."""
    info = dist.init()
    cfg = load_config(None, tiny_overrides(Path("unused"), mnist_shards, *model, "train.batch_size=16"))
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(16, 1, 28, 28, generator=gen) < 0.3).float()
    grads: dict[tuple[int, str], dict[str, Tensor]] = {}
    for accumulation in (1, 2):
        torch.manual_seed(cfg.seed)
        players = build_players(cfg.model)
        run = replace(cfg, train=replace(cfg.train, grad_accumulation=accumulation))
        engines = build_engines({"encoder": players.encoder, "decoder": players.decoder}, run, info)
        wake = game.complete_data(players.encoder, players.decoder, x, torch.Generator().manual_seed(2))
        prior = build_prior(cfg.prior, players.decoder)
        dreams = game.dream(players.decoder, prior, 16, torch.Generator().manual_seed(3), x.device)
        enc, dec = players
        for name, pairs in (("decoder", wake), ("encoder", dreams)):
            for i, rows in enumerate(torch.arange(16).chunk(accumulation)):
                part = game.Pairs(x=pairs.x[rows], z={k: v[rows] for k, v in pairs.z.items()}, dists={})
                terms = game.decoder_loss(dec, part) if name == "decoder" else game.encoder_loss(enc, dec, part)
                engines[name].backward(terms.loss)
                if i < accumulation - 1:
                    engines[name].step()  # not the boundary: only counts the micro-step
            # the gradient the optimiser steps with (Adam's first step is sign-like, so compare this, not weights)
            grads[accumulation, name] = {k: p.grad.clone() for k, p in engines[name].module.named_parameters()}
    for name in ("decoder", "encoder"):
        for key, value in grads[1, name].items():
            scale = value.abs().max().item()
            assert torch.allclose(grads[2, name][key], value, rtol=1e-5, atol=1e-6 * scale), f"{name}.{key}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_accumulation_at_every_zero_stage_matches_zero0(tmp_path: Path, mnist_shards: Path, stage: int) -> None:
    """The trainer with 2 accumulated micro-batches ends 3 steps with ZeRO-0's weights at every stage, for both
    players. Before `begin_micro_batch`, ZeRO-3 stepped with the last micro-batch's gradient only (the game calls
    the players' methods, not engine.forward, where DeepSpeed counts micro-batches): max |dw| 6e-4."""
    weights = {}
    for zero in (0, stage):
        cfg = load_config(None, tiny_overrides(tmp_path / f"z{zero}", mnist_shards, "train.grad_accumulation=2",
                                               "train.steps=3", "monitor.image_every=100", "checkpoint.every=100",
                                               f"engines.decoder.zero_stage={zero}",
                                               f"engines.encoder.zero_stage={zero}"))
        trainer = build_trainer(cfg, dist.init())
        trainer.train()
        weights[zero] = {name: consolidated_weights(engine) for name, engine in trainer.engines.items()}
        trainer.close()
    for name, state in weights[0].items():
        for key, value in state.items():
            assert torch.equal(weights[stage][name][key], value), f"{name}.{key}"


def test_alternating_accumulation_dreams_from_the_updated_decoder(tmp_path: Path, mnist_shards: Path) -> None:
    """With accumulation, the encoder's every micro-batch dreams from the decoder after its update, as at
    accumulation 1 (the alternating schedule of METHOD §4.1 at the global batch)."""
    from symeq_dist.api import build_trainer

    cfg = load_config(None, tiny_overrides(tmp_path / "run", mnist_shards, "train.grad_accumulation=2",
                                           "train.steps=1", "monitor.image_every=100", "sampling.chain_every=0"))
    trainer = build_trainer(cfg, dist.init())
    decoder = trainer.players.decoder
    seen: list[Tensor] = []  # the decoder's first weight at every ancestral sample (the dreams)
    first = next(decoder.parameters())
    decoder.register_forward_pre_hook(lambda _m, args: seen.append(first.detach().clone()) if args[0] == "sample"
                                      else None)
    before = first.detach().clone()
    try:
        trainer.train()
    finally:
        trainer.close()
    assert len(seen) >= 2 and not torch.equal(before, first)  # the two dreams (and the final grid)
    assert all(torch.equal(weights, first.detach()) for weights in seen)


def test_hierarchical_ladder_trains_and_samples(tmp_path: Path, mnist_shards: Path) -> None:
    _train(tmp_path, mnist_shards, "ladder", "model.kind=ladder", "model.num_z0=6", "model.num_z1=10",
           "model.trunk_width=16", "model.mlp_width=16", "train.steps=3")
    tags = _events(tmp_path / "ladder").Tags()["scalars"]
    assert {"train/encoder/mi/z0_mean", "train/encoder/mi/z1_mean", "train/decoder/mi/z1_mean"} <= set(tags)
    out = sample(SampleRequest(run_dir=tmp_path / "ladder", mode="limiting", steps=5, num=4, out=tmp_path / "g.png"))
    assert out.path.is_file()


def test_x_offset_is_measured_from_the_shards_and_kept_across_resume(tmp_path: Path, mnist_shards: Path) -> None:
    """model.x_offset=data_marginal: set from the training split's binarised pixels at start, loaded (not
    re-measured) on resume, and in the weights `symeq eval` loads."""
    extra = ("model.kind=ladder", "model.num_z0=6", "model.num_z1=10", "model.trunk_width=16", "model.mlp_width=16",
             "model.x_offset=data_marginal", "data.binarize_threshold=112")
    _train(tmp_path, mnist_shards, "run", *extra, "train.steps=3")
    _train(tmp_path, mnist_shards, "run", *extra, "train.steps=6", "resume=true")
    cfg = load_config(None, tiny_overrides(tmp_path / "run", mnist_shards, *extra))
    marginal = pixel_marginal(cfg.data)
    images = torch.cat([b["image"] for b in build_eval_batches(cfg.data, split="train", batch_size=1000)])
    assert torch.allclose(marginal, (((images >= 112).double().sum(0) + 1) / (len(images) + 2)).float(), atol=1e-6)
    assert marginal[0, 0, 0] < 0.01 < 0.3 < marginal[0, 14, 14]  # an empty corner, a stroke-heavy centre
    trained = load_trained(tmp_path / "run", ema=False)
    assert trained.step == 6
    assert torch.allclose(trained.decoder.x_head.offset, torch.logit(marginal), atol=1e-5)


def test_nonfinite_policy(tmp_path: Path, mnist_shards: Path) -> None:
    """An absurd learning rate drives the losses to inf/NaN: `fail` stops, `skip` counts then hits the cap."""
    blowup = ("engines.decoder.lr=1e30", "engines.encoder.lr=1e30", "train.steps=40")
    with pytest.raises(NonFiniteLoss, match=r"game\.nonfinite=fail"):
        _train(tmp_path, mnist_shards, "fail", *blowup, "game.nonfinite=fail")
    with pytest.raises(NonFiniteLoss, match=r"consecutive skipped steps \(non-finite loss"):
        _train(tmp_path, mnist_shards, "skip", *blowup, "game.max_consecutive_skips=2")


def test_cli_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "configs/debug_cpu.yaml", "train.stpes=3"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err
    assert main(["train", "configs/debug_cpu.yaml", f"data.shards={tmp_path}"]) == 2
    assert "symeq shards" in capsys.readouterr().err


def test_bf16_engines_train_and_sample(tmp_path: Path, mnist_shards: Path) -> None:
    """bf16 weights (ZeRO-1; bf16 at ZeRO-0 needs bf16 gradient accumulation): inputs follow the weights,
    log-likelihoods are reduced in fp32, and the checkpoint samples in fp32."""
    ds = tmp_path / "ds_bf16.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
                              "gradient_clipping": 0.0}))
    last = _train(tmp_path, mnist_shards, "bf16", f"engines.ds_config={ds}", "train.steps=3")
    assert math.isfinite(last["train/decoder/loss"]) and math.isfinite(last["train/encoder/loss"])
    req = SampleRequest(run_dir=tmp_path / "bf16", mode="limiting", steps=3, num=4, out=tmp_path / "g.png")
    assert sample(req).path.is_file()


LADDER_TINY = ("model.kind=ladder", "model.num_z0=6", "model.num_z1=10", "model.trunk_width=16", "model.mlp_width=16")


@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_autocast_with_channels_last_trains_close_to_fp32_and_resumes_bitwise(tmp_path: Path, mnist_shards: Path,
                                                                                  stage: int) -> None:
    """ds_config `torch_autocast` (fp32 weights, bf16 forwards) with train.channels_last: the conv forwards really
    run in bf16 (on channels-last tensors at ZeRO-0, where the weights can be re-laid out), the first step's losses
    (same init, same draws) stay within bf16's tolerance of fp32 but are not identical, and a run resumed at step
    3 logs the uninterrupted run's losses."""
    ds = json.loads((ROOT / "configs" / "ds_config_cpu_autocast.json").read_text())
    ds["zero_optimization"]["stage"] = stage
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    fast = (*LADDER_TINY, f"engines.ds_config={tmp_path / 'ds.json'}", "train.channels_last=true")
    _train(tmp_path, mnist_shards, "fp32", *LADDER_TINY, "train.steps=1")
    _train(tmp_path, mnist_shards, "full", *fast)
    _train(tmp_path, mnist_shards, "part", *fast, "train.steps=3")
    _train(tmp_path, mnist_shards, "part", *fast, "resume=true")
    for tag in ("train/decoder/loss", "train/encoder/loss"):
        fp32, full, part = (_scalars(tmp_path / name, tag) for name in ("fp32", "full", "part"))
        assert full[1] != fp32[1] and full[1] == pytest.approx(fp32[1], rel=0.02), tag
        assert [part[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)], tag

    cfg = load_config(None, tiny_overrides(tmp_path / "probe", mnist_shards, *fast))
    trainer = build_trainer(cfg, dist.init())
    seen: list[tuple[torch.dtype, bool]] = []
    conv = next(m for m in trainer.players.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)
                and m.stride[0] == 2)
    conv.register_forward_hook(lambda m, args, out: seen.append(
        (out.dtype, out.is_contiguous(memory_format=torch.channels_last))))
    trainer.train(until=1)
    trainer.close()
    assert seen and all(entry == (torch.bfloat16, stage == 0) for entry in seen), seen


def test_ds_config_precision_sections_are_checked(tmp_path: Path, mnist_shards: Path) -> None:
    ds = tmp_path / "ds.json"
    for section, match in (({"bf16": {"enabled": True}, "torch_autocast": {"enabled": True}}, "choose one"),
                           ({"torch_autocast": {"enabled": True, "dtype": "float16"}}, "use \"bfloat16\"")):
        ds.write_text(json.dumps({**section, "gradient_clipping": 0.0}))
        with pytest.raises(ConfigError, match=match):
            _train(tmp_path, mnist_shards, "a", f"engines.ds_config={ds}")


def test_init_from_starts_both_players_from_another_runs_weights(tmp_path: Path, mnist_shards: Path) -> None:
    """An ELBO run's trained weights start a symmetric run (fresh step 0); another model is refused by name."""
    _train(tmp_path, mnist_shards, "elbo", "game.kind=elbo", "train.steps=3")
    source = checkpoint.read_weights(checkpoint.latest_dir(tmp_path / "elbo"))
    cfg = load_config(None, tiny_overrides(tmp_path / "sym", mnist_shards, f"train.init_from={tmp_path / 'elbo'}"))
    trainer = build_trainer(cfg, dist.init())
    try:
        assert trainer.state.step == 0
        for name in ("encoder", "decoder"):
            for key, value in trainer.engines[name].module.state_dict().items():
                assert torch.equal(value, source[name][key]), f"{name}.{key}"
    finally:
        trainer.close()
    with pytest.raises(ConfigError, match=r"model\.hidden: 32 there, 48 here"):
        _train(tmp_path, mnist_shards, "other", f"train.init_from={tmp_path / 'elbo'}", "model.hidden=48")


def test_ds_config_may_not_hold_run_numbers(tmp_path: Path, mnist_shards: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 64, "gradient_clipping": 0.0}))
    with pytest.raises(ValueError, match=r"'train_batch_size' must not be set here.*train\.batch_size"):
        _train(tmp_path, mnist_shards, "a", f"engines.ds_config={ds}")
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    with pytest.raises(ValueError, match="set 'gradient_clipping' explicitly"):
        _train(tmp_path, mnist_shards, "b", f"engines.ds_config={ds}")


def test_killed_run_resumes_exactly(tmp_path: Path, mnist_shards: Path) -> None:
    """SIGKILL a real `symeq train` process after its first checkpoint; `resume=true` then logs exactly the
    losses of an uninterrupted run for every step after the checkpoint."""
    env = subprocess_env()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)

    def cmd(name: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "symeq_dist.cli", "train", str(ROOT / "configs" / "debug_cpu.yaml"),
                *tiny_overrides(tmp_path / name, mnist_shards, "train.steps=40", "checkpoint.every=10",
                                "monitor.image_every=100"), *extra]

    subprocess.run(cmd("full"), env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(cmd("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while checkpoint.latest_dir(tmp_path / "killed") is None and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    resumed_from = int(checkpoint.latest_dir(tmp_path / "killed").name.split("_")[1])
    assert resumed_from < 40, "the run finished before it could be killed"
    subprocess.run(cmd("killed", "resume=true"), env=env, check=True, capture_output=True, timeout=300)
    for tag in ("train/decoder/loss", "train/encoder/loss"):
        full, resumed = _scalars(tmp_path / "full", tag), _scalars(tmp_path / "killed", tag)
        steps = range(resumed_from + 1, 41)
        assert [resumed[s] for s in steps] == [full[s] for s in steps], tag


def test_bad_samples_skip_is_counted_in_tensorboard_and_fail_names_the_shard(tmp_path: Path,
                                                                              mnist_shards: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(mnist_shards, shards)
    for path in sorted(shards.glob("mnist-train-*.tar"))[::2]:  # half the train shards lose their block
        path.write_bytes(path.read_bytes()[:1000])
    _train(tmp_path, shards, "skip", "data.bad_samples=skip")
    skipped = _scalars(tmp_path / "skip", "data/skipped")
    values = [skipped[step] for step in sorted(skipped)]
    assert sorted(skipped) == [1, 2, 3, 4, 5, 6] and values == sorted(values) and 0 < values[-1] < 96
    assert values[-1] == int(values[-1])
    with pytest.raises(DataError, match=r"mnist-train-0000\d\d\.tar, sample #\d+: not in the tar: .*truncated"):
        _train(tmp_path, shards, "fail", "data.bad_samples=fail")


def _decoder_iteration(engine: Any, pairs: game.Pairs, scale: float, boundary_step: bool) -> None:
    """2 micro-batches of the decoder's loss; the boundary's engine.step() only if `boundary_step`."""
    for i, rows in enumerate(torch.arange(len(pairs.x)).chunk(2)):
        part = game.Pairs(x=pairs.x[rows], z={k: v[rows] for k, v in pairs.z.items()}, dists={})
        begin_micro_batch(engine)
        engine.backward(scale * game.decoder_loss(engine.module, part).loss)
        if i == 0 or boundary_step:
            engine.step()


@pytest.mark.parametrize("stage, bf16", [(0, False), (1, False), (2, False), (3, False), (0, True), (3, True)],
                         ids=["zero0", "zero1", "zero2", "zero3", "zero0-bf16", "zero3-bf16"])
def test_discarded_gradients_leave_no_trace(tmp_path: Path, mnist_shards: Path, stage: int, bf16: bool) -> None:
    """A skipped update at every ZeRO stage, with 2 accumulated micro-batches: after the backward of a huge
    gradient of other data is discarded at the boundary, the next iteration's micro-batches and step give the
    weights of an engine that never saw it (no gradient left over, the accumulation boundary where it was)."""
    info = dist.init()
    ds_config = json.loads((ROOT / "ds_config.json").read_text())
    ds_config["bf16"] = {"enabled": bf16}
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    cfg = load_config(None, tiny_overrides(Path("unused"), mnist_shards, f"engines.decoder.zero_stage={stage}",
                                           f"engines.ds_config={tmp_path / 'ds.json'}", "train.batch_size=8",
                                           "train.grad_accumulation=2"))
    x = (torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    after: dict[bool, dict[str, Tensor]] = {}
    for spiked in (False, True):
        torch.manual_seed(cfg.seed)
        players = build_players(cfg.model)
        engine = build_engines({"decoder": players.decoder}, cfg, info)["decoder"]
        wake = game.complete_data(players.encoder, players.decoder, x, torch.Generator().manual_seed(2))
        if spiked:  # a huge gradient of other data: any of it left over would move the weights elsewhere
            _decoder_iteration(engine, game.Pairs(x=1 - wake.x, z=wake.z, dists={}), 1e4, boundary_step=False)
            discard_gradients(engine)
        _decoder_iteration(engine, wake, 1.0, boundary_step=True)
        assert engine.global_steps == 1
        after[spiked] = consolidated_weights(engine)
    for key, value in after[False].items():
        assert torch.equal(after[True][key], value), key
