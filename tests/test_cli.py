"""The `symeq` command: what it reports as bad input (exit 2, one line) and what it lets through as a bug."""

from __future__ import annotations

from pathlib import Path

import pytest

from symeq_dist import api
from symeq_dist.cli import main
from symeq_dist.config import ConfigError
from tests.conftest import ROOT, tiny_overrides


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
