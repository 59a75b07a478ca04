"""The import rules of STYLE.md: one home each for deepspeed, webdataset and tensorboard."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "symeq_dist"
ONLY_IMPORTERS = {
    "deepspeed": {"engines.py", "checkpoint.py"},
    "webdataset": {"data/shards.py", "data/convert.py"},
    "tensorboard": {"monitor.py"},
}


@pytest.mark.parametrize("library", sorted(ONLY_IMPORTERS))
def test_library_has_one_home(library: str) -> None:
    pattern = re.compile(rf"^\s*(import|from)\s+(torch\.utils\.)?{library}\b", re.M)
    importers = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())}
    assert importers, f"nobody imports {library}: the rule is stale"
    assert importers <= ONLY_IMPORTERS[library], f"{library} imported outside its home: {importers}"


def test_game_never_steps_or_backpropagates() -> None:
    source = (PACKAGE / "game.py").read_text().split('"""', 2)[2]  # code after the module docstring
    assert ".backward(" not in source and ".step(" not in source
