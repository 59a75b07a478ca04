"""The README's command blocks run as written: Training (with every step count divided by 500, as the README
says) and the CPU lines of "Several processes", in a fresh directory holding only configs/ and ds_config.json."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from symeq_dist.runtime import checkpoint
from tests.conftest import ROOT, subprocess_env

pytestmark = pytest.mark.dist
BIN = Path(sys.executable).parent


def readme_block(heading: str) -> list[str]:
    """The commands of the first ```bash block after `heading`: comments dropped, `a ; b` split."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index(heading):].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            commands += [part.strip() for part in line.split(";")]
    return commands


def run(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    args = shlex.split(command)
    args[0] = str(BIN / Path(args[0]).name) if args[0].startswith(".venv/bin/") else args[0]
    done = subprocess.run(args, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copy(ROOT / "ds_config.json", tmp_path)
    return tmp_path


def test_training_block_runs_as_written(fresh: Path) -> None:
    commands = readme_block("## Training")
    assert [c.split()[1] for c in commands if c.startswith(".venv/bin/symeq ")][:5] == \
        ["shards", "train", "train", "resume", "sample"]
    for command in commands:
        quick = re.sub(r"(train\.steps=|--steps )(\d+)", lambda m: f"{m[1]}{int(m[2]) // 500}", command)
        run(quick, fresh)
    run_dir = fresh / "runs" / "mlp"
    meta = checkpoint.load_meta(run_dir)
    assert meta["step"] == 6000 // 500 and meta["config"]["engines"]["decoder"]["lr"] == 2e-3
    assert (fresh / "grid.png").is_file()


def test_multi_process_block_runs_as_written(fresh: Path) -> None:
    run(".venv/bin/symeq shards mnist", fresh)
    commands = [c for c in readme_block("## Several processes") if c.startswith(".venv/bin/")]
    assert len(commands) == 3  # the launcher, the one-process resume, torchrun (GPU lines need GPUs)
    for command in commands:
        run(command, fresh)
    assert checkpoint.load_meta(fresh / "runs" / "two")["step"] == 40
    assert checkpoint.load_meta(fresh / "runs" / "debug")["world_size"] == 2
