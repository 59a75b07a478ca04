"""The `symeq` command: what it reports as bad input (exit 2, one line) and what it lets through as a bug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from symeq_dist import api
from symeq_dist.cli import main
from symeq_dist.config import ConfigError
from tests.conftest import ROOT, subprocess_env, tiny_overrides


def test_bad_input_is_one_line_with_exit_2(tmp_path: Path, mnist_shards: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    overrides = tiny_overrides(tmp_path / "r", mnist_shards, "train.stpes=3")
    code = main(["train", str(ROOT / "configs/debug_cpu.yaml"), *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("symeq: error: train.stpes: unknown key; did you mean 'train.steps'?")
    assert "Traceback" not in err


def test_missing_file_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml not found" in capsys.readouterr().err


@pytest.mark.parametrize("bug", [ValueError("a bug deep in the code"), FileNotFoundError("/internal/cache"),
                                 KeyError("x")])
def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, bug: Exception) -> None:
    """Only the project's InputError is turned into "bad input": a ValueError from a real bug propagates."""
    def broken(*_args: object, **_kwargs: object) -> None:
        raise bug

    monkeypatch.setattr(api, "train", broken)
    with pytest.raises(type(bug)):
        main(["train", str(ROOT / "configs/debug_cpu.yaml")])


def test_input_errors_are_one_family() -> None:
    """Every error type the package raises for bad input derives from InputError (and stays a ValueError)."""
    from symeq_dist.data import DataError
    from symeq_dist.data.schema import BadSample
    from symeq_dist.datasets.convert import ConversionError
    from symeq_dist.errors import InputError, MissingInput
    from symeq_dist.runtime.checkpoint import CheckpointError

    for error in (ConfigError, DataError, BadSample, ConversionError, CheckpointError, MissingInput):
        assert issubclass(error, InputError), error
    assert issubclass(MissingInput, FileNotFoundError) and issubclass(InputError, ValueError)


def test_demo_runs_end_to_end_at_a_tiny_length(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`make demo`'s path (`symeq demo`), 20 steps: shards written when missing, training, final grids, summary."""
    monkeypatch.chdir(tmp_path)
    shards = tmp_path / "data_shards" / "mnist"
    code = main(["demo", "--config", str(ROOT / "configs/demo_mnist_mlp.yaml"), "--chain-steps", "5",
                 "train.steps=20", "model.hidden=64",
                 "monitor.log_every=10", "monitor.progress=false", f"engines.ds_config={ROOT / 'ds_config.json'}",
                 f"data.shards={shards}"])
    out = capsys.readouterr().out
    assert code == 0 and (shards / "manifest.json").is_file()
    (run,) = (tmp_path / "runs").iterdir()
    for mode in ("random", "limiting"):
        assert (run / "samples" / f"final_{mode}.png").is_file() and f"final_{mode}.png" in out
    assert "final losses (nats per sample): decoder" in out and f"tensorboard --logdir {run.relative_to(tmp_path)}/tb" \
        in out
    assert "train/encoder/mi/z_mean" in out


def test_sample_random_from_the_command_line(tmp_path: Path, mnist_shards: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs/debug_cpu.yaml"), *tiny_overrides(run, mnist_shards, "train.steps=2",
                                                                                "checkpoint.every=2")]) == 0
    out = tmp_path / "random.png"
    assert main(["sample", str(run), "--mode", "random", "--n", "9", "--out", str(out)]) == 0
    assert out.is_file() and f"wrote {out}: 9 random-code samples (grid)" in capsys.readouterr().out
    from PIL import Image

    with Image.open(out) as grid:  # 3 x 3 grid of 28 x 28 with 2-pixel padding, enlarged to >= 480 wide
        assert grid.width >= 480 and grid.width % (3 * 30 + 2) == 0


def _plain_env() -> dict[str, str]:
    """A shell's environment as the README's direct `.venv/bin/symeq` commands see it: no DS_ACCELERATOR and
    no TORCH_EXTENSIONS_DIR (make exports the first; nothing sets the second)."""
    env = subprocess_env()
    for key in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR"):
        env.pop(key, None)
    return env


def test_help_and_data_commands_do_not_load_deepspeed(mnist_shards: Path) -> None:
    code = ("import sys\nfrom symeq_dist.cli import main\n"
            f"for argv in (['--help'], ['train', '--help'], ['shards', '--help'], ['compare', '--help'], "
            f"['shards', 'verify', {str(mnist_shards)!r}]):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('deepspeed' in sys.modules, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_plain_env(), cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False False"
    assert "Setting accelerator" not in done.stderr + done.stdout


def test_training_names_the_accelerator_once_and_builds_nothing(tmp_path: Path, mnist_shards: Path) -> None:
    """The DeepSpeed op was built at set-up where every entry point looks, so a direct run starts at once."""
    cmd = [sys.executable, "-m", "symeq_dist.cli", "train", str(ROOT / "configs/debug_cpu.yaml"),
           *tiny_overrides(tmp_path / "run", mnist_shards, "train.steps=2", "checkpoint.every=2")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_plain_env(), cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stderr + done.stdout
    assert "Setting accelerator" not in log and "building DeepSpeed's" not in log
    assert log.count("accelerator cpu (gloo), 1 process(es)") == 1


@pytest.mark.parametrize("mode", ["random", "limiting"])
def test_sample_formats_for_fid_tools(tmp_path: Path, mnist_shards: Path, mode: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`symeq sample --format png-dir|npz`: the sets pytorch-fid, clean-fid and torch-fidelity read, in chunks of
    --batch-size, reproducible under --seed; the printed line names the checkpoint's training step."""
    import numpy as np
    from PIL import Image

    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs/debug_cpu.yaml"), *tiny_overrides(run, mnist_shards, "train.steps=2",
                                                                                "checkpoint.every=2")]) == 0
    capsys.readouterr()
    common = ["sample", str(run), "--mode", mode, "--steps", "2", "--n", "7", "--batch-size", "3"]
    assert main([*common, "--format", "png-dir", "--out", str(tmp_path / "pngs")]) == 0
    assert "at training step 2" in capsys.readouterr().out
    pngs = sorted((tmp_path / "pngs").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(7)]
    with Image.open(pngs[0]) as first:
        assert first.size == (28, 28) and first.mode == "L"
    assert main([*common, "--format", "npz", "--out", str(tmp_path / "s.npz")]) == 0
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (7, 28, 28, 1) and arr.dtype == np.uint8
    assert all(np.array_equal(arr[i, ..., 0], np.asarray(Image.open(p))) for i, p in enumerate(pngs))  # same seed
    assert main([*common, "--format", "npz", "--out", str(tmp_path / "bad.png")]) == 2  # named: needs .npz
