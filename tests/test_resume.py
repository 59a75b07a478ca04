"""A researcher's first day with resume and the run directory (issue 10): resume cannot be broken by a path, a
refused start writes nothing, every error names the file, TensorBoard shows each step once."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from symeq_dist.api import load_run_config
from symeq_dist.api import train as run_training
from symeq_dist.config import ConfigError, load_config
from symeq_dist.runtime import checkpoint
from tests.conftest import ROOT, subprocess_env, tiny_overrides

CONFIG = str(ROOT / "configs" / "debug_cpu.yaml")


def _cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "symeq_dist.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env or subprocess_env(), timeout=300)


def _tiny(run_dir: str | Path, shards: Path, *extra: str) -> list[str]:
    return tiny_overrides(Path(run_dir), shards, "checkpoint.every=2", "monitor.image_every=100", *extra)


def _steps(run_dir: Path, tag: str = "train/decoder/loss") -> list[int]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


# ---------------------------------------------------------------- 1-3: resume from anywhere
def test_a_run_resumes_whatever_path_names_it(tmp_path: Path, mnist_shards: Path) -> None:
    """Started with a relative run_dir from one directory, resumed with an absolute path, then from another
    directory through `symeq resume RUN_DIR`, then after the run directory was moved."""
    first = _cli("train", CONFIG, *_tiny("runs/two", mnist_shards, "train.steps=2"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "runs" / "two"
    again = _cli("train", CONFIG, *_tiny(run, mnist_shards, "train.steps=4", "resume=true"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert checkpoint.load_meta(run)["step"] == 4
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(run, moved)
    other = tmp_path / "other"
    other.mkdir()
    third = _cli("resume", str(moved), "train.steps=6", cwd=other)
    assert third.returncode == 0, third.stderr[-2000:]
    assert checkpoint.load_meta(moved)["step"] == 6
    fourth = _cli("train", str(moved / "config.yaml"), "resume=true", "train.steps=8", cwd=other)
    assert fourth.returncode == 0, fourth.stderr[-2000:]
    assert checkpoint.load_meta(moved)["step"] == 8


def test_resume_takes_the_runs_stored_config(tmp_path: Path, mnist_shards: Path) -> None:
    """The README's Training block as written: a run started with an override resumes without repeating it."""
    run = tmp_path / "run"
    run_training(load_config(CONFIG, _tiny(run, mnist_shards, "train.steps=2", "engines.decoder.lr=2e-4")))
    run_training(load_run_config(CONFIG, _tiny(run, mnist_shards, "train.steps=4", "resume=true")))
    stored = checkpoint.load_meta(run)["config"]
    assert checkpoint.load_meta(run)["step"] == 4 and stored["engines"]["decoder"]["lr"] == 2e-4
    with pytest.raises(ConfigError, match=r"engines.decoder.lr.*cannot change on resume"):
        run_training(load_run_config(CONFIG, _tiny(run, mnist_shards, "train.steps=6", "resume=true",
                                                   "engines.decoder.lr=1e-3")))


def test_a_refused_start_writes_nothing(tmp_path: Path, mnist_shards: Path) -> None:
    run = tmp_path / "run"
    run_training(load_config(CONFIG, _tiny(run, mnist_shards, "train.steps=2", "engines.decoder.lr=2e-4")))
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "command.txt")}
    for load in (load_config, load_run_config):  # the library path (a RunConfig) and the command line's
        with pytest.raises(ConfigError, match=r"model\.hidden: 32 -> 64: cannot change on resume"):
            run_training(load(CONFIG, _tiny(run, mnist_shards, "train.steps=4", "resume=true", "model.hidden=64")))
    assert {name: (run / name).read_bytes() for name in before} == before
    fresh = tmp_path / "fresh"
    bad_ds = tmp_path / "ds.json"
    bad_ds.write_text(json.dumps({"train_batch_size": 8, "gradient_clipping": 0.0}))
    for extra in ("train.batch_size=33", f"engines.ds_config={bad_ds}"):  # 33 does not split into 2 micro-batches
        with pytest.raises(ConfigError):
            run_training(load_config(CONFIG, _tiny(fresh, mnist_shards, extra, "train.grad_accumulation=2")))
        assert not (fresh / "config.yaml").exists() and not (fresh / "command.txt").exists()
        assert not (fresh / "tb").exists()


# ---------------------------------------------------------------- 4-6
def test_nothing_to_train_is_said(tmp_path: Path, mnist_shards: Path) -> None:
    run = tmp_path / "run"
    assert _cli("train", CONFIG, *_tiny(run, mnist_shards, "train.steps=2")).returncode == 0
    done = _cli("train", CONFIG, *_tiny(run, mnist_shards, "train.steps=2", "resume=true"))
    assert done.returncode == 0 and "nothing to train: the run is at step 2 and train.steps=2" in done.stderr
    zero = _cli("train", CONFIG, *_tiny(tmp_path / "zero", mnist_shards, "train.steps=0"))
    assert zero.returncode == 0 and "nothing to train" in zero.stderr


def test_tensorboard_shows_each_step_once_after_a_crash(tmp_path: Path, mnist_shards: Path) -> None:
    """Killed after step 3 (checkpoint at 2): the resumed run purges the logged step 3 and logs it again."""
    run = tmp_path / "run"
    env = subprocess_env(SYMEQ_FAULT="kill:4:0")
    crashed = _cli("train", CONFIG, *_tiny(run, mnist_shards, "train.steps=6"), env=env)
    assert crashed.returncode != 0 and _steps(run) == [1, 2, 3]
    assert _cli("train", CONFIG, *_tiny(run, mnist_shards, "train.steps=6", "resume=true")).returncode == 0
    assert _steps(run) == [1, 2, 3, 4, 5, 6]


def test_preempted_marker_goes_after_a_successful_resume(tmp_path: Path, mnist_shards: Path) -> None:
    run = tmp_path / "run"
    env = subprocess_env(SYMEQ_FAULT="usr1:2:0")
    assert _cli("train", CONFIG, *_tiny(run, mnist_shards, "train.steps=4"), env=env).returncode == 75
    assert (run / "PREEMPTED").is_file()
    assert _cli("train", CONFIG, *_tiny(run, mnist_shards, "train.steps=4", "resume=true")).returncode == 0
    assert not (run / "PREEMPTED").exists()


# ---------------------------------------------------------------- 7-8: errors that name the file
def test_a_truncated_engine_file_is_named_with_the_fix(tmp_path: Path, mnist_shards: Path) -> None:
    run = tmp_path / "run"
    run_training(load_config(CONFIG, _tiny(run, mnist_shards, "train.steps=4")))
    broken = checkpoint.step_dir(run, 4) / "encoder" / "mp_rank_00_model_states.pt"
    broken.write_bytes(broken.read_bytes()[:200])
    resumed = _cli("train", CONFIG, *_tiny(run, mnist_shards, "train.steps=6", "resume=true"))
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr
    assert str(broken) in resumed.stderr and "step_00000002" in resumed.stderr


@pytest.mark.parametrize("what", ["yaml file", "override", "meta.json", "latest", "ds_config"])
def test_malformed_files_are_named(tmp_path: Path, mnist_shards: Path, what: str) -> None:
    run = tmp_path / "run"
    args = ["train", CONFIG, *_tiny(run, mnist_shards, "train.steps=2")]
    if what in ("meta.json", "latest"):
        assert _cli(*args).returncode == 0
        target = checkpoint.step_dir(run, 2) / "meta.json" if what == "meta.json" else run / "checkpoints" / "latest"
        target.write_bytes(b"\x89\xff{ not json" if what == "latest" else b"{ not json")
        args = [*args, "resume=true", "train.steps=4"]
        named = str(target)
    elif what == "yaml file":
        bad = tmp_path / "bad.yaml"
        bad.write_text("train: {steps: 3\nmodel: [\n")
        args, named = ["train", str(bad)], str(bad)
    elif what == "override":
        args, named = [*args, "model.image_shape=[1,28"], "model.image_shape=[1,28"
    else:
        bad = tmp_path / "ds.json"
        bad.write_text('{"bf16": {"enabled": false},')
        args, named = [*args, f"engines.ds_config={bad}"], str(bad)
    done = _cli(*args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and named in done.stderr and "symeq: error:" in done.stderr


def test_a_zero_stage_changed_inside_ds_config_is_refused(tmp_path: Path, mnist_shards: Path) -> None:
    """The same ds_config file edited between the runs: the config matches, the checkpoint's stages do not."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 0.0}))
    run = tmp_path / "run"
    run_training(load_config(CONFIG, _tiny(run, mnist_shards, "train.steps=2", f"engines.ds_config={ds}")))
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}, "gradient_clipping": 0.0}))
    with pytest.raises(checkpoint.CheckpointError, match="engine at ZeRO stage 2, this run builds stage 1"):
        run_training(load_run_config(CONFIG, _tiny(run, mnist_shards, "train.steps=4", "resume=true",
                                                   f"engines.ds_config={ds}")))


# ---------------------------------------------------------------- 9-10: logs in files
@pytest.mark.parametrize("extra", [(), ("monitor.progress=false",), ("game.kind=elbo",)], ids=["default",
                                                                                             "no-progress", "elbo"])
def test_logs_read_well_in_a_file(tmp_path: Path, mnist_shards: Path, extra: tuple[str, ...]) -> None:
    """Not a terminal (a SLURM output file): no progress bar, a plain line per logging interval with the step,
    every engine's loss (the ELBO's joint loss and its terms), MI and throughput, then a summary."""
    run = tmp_path / "run"
    done = _cli("train", CONFIG, *_tiny(run, mnist_shards, "train.steps=4", "monitor.log_every=2", *extra))
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stderr + done.stdout
    assert "\r" not in log and "it/s]" not in log  # no tqdm redraws
    lines = [line for line in log.splitlines() if re.search(r"symeq: step \d+/4 \|", line)]
    assert len(lines) == 2 and all("img/s | ETA" in line and "nan" not in line for line in lines)
    losses = ["joint", "(x ", "kl "] if "game.kind=elbo" in extra else ["decoder", "encoder"]
    assert all(all(word in line for word in losses) for line in lines) and "MI enc" in lines[-1]
    assert f"checkpoint: {checkpoint.latest_dir(run)}" in log
    assert f"tensorboard --logdir {run / 'tb'}" in log and "sample grids:" in log
