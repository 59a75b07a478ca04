"""The layout rules of STYLE.md: one home per library, rooms that import only downwards, no cycles, sizes."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, subprocess_env, tiny_overrides

PACKAGE = ROOT / "symeq_dist"
ONLY_IMPORTERS = {
    "deepspeed": {"runtime/engines.py", "runtime/checkpoint.py", "runtime/ops.py"},
    "webdataset": {"datasets/common.py"},
    "tensorboard": {"runtime/monitor.py"},
    "accelerate": {"priors/trainer.py"},  # the prior-model trainer; the game's engines are DeepSpeed's
}
# room -> rooms it must not import (module level or inside functions); STYLE.md §2
FORBIDDEN = {
    "config": {"models", "priors", "game", "runtime", "data", "datasets", "train", "eval", "api", "cli"},
    "models": {"priors", "game", "runtime", "data", "datasets", "train", "eval", "api", "cli"},
    "priors": {"runtime", "game", "train", "eval", "datasets", "api", "cli"},
    "game": {"runtime", "data", "datasets", "train", "eval", "api", "cli"},
    "sampling": {"runtime", "data", "datasets", "train", "eval", "api", "cli"},
    "runtime": {"models", "priors", "game", "sampling", "data", "datasets", "train", "eval", "api", "cli"},
    "data": {"models", "priors", "game", "sampling", "runtime", "datasets", "train", "eval", "api", "cli"},
    "datasets": {"models", "priors", "game", "sampling", "runtime", "train", "eval", "api", "cli"},
    "train": {"datasets", "eval", "api", "cli"},
    "eval": {"train", "datasets", "api", "cli"},
}
# (importer room, imported module) pairs the table above forbids but STYLE.md allows: the prior trainer keeps its
# checkpoints in the game's layout through the deepspeed-free directory helpers (STYLE.md: priors must not import
# runtime.engines)
EXCEPTIONS = {("priors", "symeq_dist.runtime.ckpt_dirs")}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """symeq_dist modules imported by `path` (a `from a import b` counts a.b when that is a module)."""
    modules = _modules()
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("symeq_dist")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("symeq_dist"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return {name for name in found if name in modules}


def _room(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


@pytest.mark.parametrize("library", sorted(ONLY_IMPORTERS))
def test_library_has_one_home(library: str) -> None:
    pattern = re.compile(rf"^\s*(import|from)\s+(torch\.utils\.)?{library}\b", re.M)
    importers = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())}
    assert importers, f"nobody imports {library}: the rule is stale"
    assert importers <= ONLY_IMPORTERS[library], f"{library} imported outside its home: {importers}"


def test_rooms_import_only_what_they_may() -> None:
    problems = []
    for module, path in _modules().items():
        room = _room(module)
        for imported in _imports(path, top_level_only=False):
            if _room(imported) in FORBIDDEN.get(room, set()) and (room, imported) not in EXCEPTIONS:
                problems.append(f"{module} imports {imported}")
    assert not problems, "\n".join(problems)


def test_no_import_cycles() -> None:
    """Module-level imports between package modules form a DAG (a cycle breaks as soon as the order changes)."""
    graph = {module: _imports(path, top_level_only=True) for module, path in _modules().items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycle = trail[trail.index(dep):] if dep in trail else trail
                pytest.fail(f"import cycle: {' -> '.join([*cycle, dep])}")
            if dep not in state:
                visit(dep, [*trail, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_modules_stay_under_the_size_cap() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}


def test_game_never_steps_or_backpropagates() -> None:
    for path in (PACKAGE / "game").glob("*.py"):
        source = path.read_text().split('"""', 2)[2]  # code after the module docstring
        assert ".backward(" not in source and ".step(" not in source, path


def test_symeq_train_never_loads_the_offline_converters(tmp_path: Path, mnist_shards: Path) -> None:
    """A real `symeq train` run (2 steps) in a fresh interpreter: no symeq_dist.datasets module gets imported."""
    overrides = tiny_overrides(tmp_path / "run", mnist_shards, "train.steps=2", "checkpoint.every=2",
                               "monitor.image_every=2")
    code = ("import sys\nfrom symeq_dist.cli import main\n"
            f"assert main(['train', {str(ROOT / 'configs/debug_cpu.yaml')!r}, *{overrides!r}]) == 0\n"
            "print(sorted(m for m in sys.modules if m.startswith('symeq_dist.datasets')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


def test_every_imported_library_is_a_declared_dependency() -> None:
    """A fresh `pip install .` must bring every third-party module the package imports (anywhere in a file)."""
    import importlib.metadata

    import tomllib

    declared = {re.split(r"[<>=!~ \[;]", dep, maxsplit=1)[0].lower().replace("_", "-")
                for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    owners = importlib.metadata.packages_distributions()  # top-level module -> distributions providing it
    stdlib = set(sys.stdlib_module_names)
    missing = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run
                continue
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            for top in {name.split(".")[0] for name in names} - stdlib - {"symeq_dist"}:
                dists = {d.lower().replace("_", "-") for d in owners.get(top, [top])}
                if not dists & declared:
                    missing.setdefault(top, str(path.relative_to(ROOT)))
    assert missing == {}, f"imported but not declared in pyproject.toml: {missing}"
