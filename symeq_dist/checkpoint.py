"""Checkpoints: both engines, every rank's train state, and an atomic `latest` pointer.

Layout (STYLE.md §3.3):

    <run_dir>/checkpoints/step_00000500/encoder/...      engine.save_checkpoint(step_dir, tag="encoder"), all ranks
    <run_dir>/checkpoints/step_00000500/decoder/...      (ELBO: a single "joint" engine)
    <run_dir>/checkpoints/step_00000500/rank_00000.pt    TrainState, RNG states, stream position, chain, MI EMAs
    <run_dir>/checkpoints/step_00000500/meta.json        step, world size, engine names, config (rank 0, last)
    <run_dir>/checkpoints/latest                         "step_00000500", replaced by atomic rename after a barrier

A checkpoint is complete or invisible: `latest` only ever names a directory whose every file was
written. The last `keep_last` complete checkpoints are kept. Must not import game.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from torch import nn

from symeq_dist.dist import DistInfo, barrier
from symeq_dist.engines import Engines

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing or does not fit this run; the message names the fix."""


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return ckpt_root(run_dir) / f"step_{step:08d}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def latest_dir(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    pointer = ckpt_root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    target = ckpt_root(run_dir) / pointer.read_text().strip()
    if not (target / "meta.json").is_file():
        raise CheckpointError(f"{pointer} names {target}, which is incomplete; delete {pointer} to start "
                              "over or point it at an older step_* directory")
    return target


def save(run_dir: str | Path, step: int, engines: Engines, rank_state: dict[str, Any], *,
         meta: dict[str, Any], info: DistInfo, keep_last: int) -> Path:
    """Collective: every rank must call it. Returns the new checkpoint directory."""
    target = step_dir(run_dir, step)
    if info.is_main and target.exists():  # a partial directory left by a killed run, never `latest`
        shutil.rmtree(target)
    barrier(info)
    for name, engine in engines.items():
        engine.save_checkpoint(str(target), tag=name, client_state={"step": step}, save_latest=False)
    target.mkdir(parents=True, exist_ok=True)
    buffer_path = target / f"rank_{info.rank:05d}.pt"
    torch.save(rank_state, buffer_path.with_suffix(".tmp"))
    os.replace(buffer_path.with_suffix(".tmp"), buffer_path)
    barrier(info)
    if info.is_main:
        full_meta = {**meta, "step": step, "world_size": info.world_size,
                     "engines": [name for name, _ in engines.items()],
                     "zero_stages": {name: int(e.zero_optimization_stage()) for name, e in engines.items()}}
        _atomic_write(target / "meta.json", json.dumps(full_meta, indent=1).encode())
        _atomic_write(ckpt_root(run_dir) / "latest", target.name.encode())
        _prune(run_dir, keep_last)
    barrier(info)
    log.info("checkpoint %s written", target)
    return target


def _prune(run_dir: str | Path, keep_last: int) -> None:
    done = sorted(p for p in ckpt_root(run_dir).glob("step_*") if (p / "meta.json").is_file())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load(run_dir: str | Path, engines: Engines, info: DistInfo) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore both engines (weights and optimiser states) and return (this rank's state, meta).

    Raises:
        CheckpointError: no checkpoint, another world size, or other engines than this run builds.
    """
    target = latest_dir(run_dir)
    if target is None:
        raise CheckpointError(f"resume=true but {ckpt_root(run_dir)} holds no checkpoint; "
                              "drop resume=true to start a new run")
    meta = json.loads((target / "meta.json").read_text())
    if meta["world_size"] != info.world_size:
        raise CheckpointError(f"{target} was written by {meta['world_size']} ranks, this run has "
                              f"{info.world_size}; resume with the same number of processes "
                              "(re-sharding to another world size is not supported yet)")
    names = [name for name, _ in engines.items()]
    if meta["engines"] != names:
        raise CheckpointError(f"{target} holds engines {meta['engines']}, this run builds {names}; "
                              "game.kind must match the run being resumed")
    for name, engine in engines.items():
        path, _ = engine.load_checkpoint(str(target), tag=name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed found no '{name}' engine checkpoint in {target}")
    rank_state = torch.load(target / f"rank_{info.rank:05d}.pt", map_location="cpu", weights_only=False)
    return rank_state, meta


def load_meta(run_dir: str | Path) -> dict[str, Any]:
    """meta.json of the latest checkpoint (step, world size, engines, resolved config)."""
    target = latest_dir(run_dir)
    if target is None:
        raise CheckpointError(f"{ckpt_root(run_dir)} holds no checkpoint; train the run first "
                              "(symeq train CONFIG run_dir=...)")
    return json.loads((target / "meta.json").read_text())


def _engine_state_dict(target: Path, name: str, stage: int) -> dict[str, torch.Tensor]:
    if stage >= 3:  # parameters are partitioned: consolidate the fp32 shards
        return get_fp32_state_dict_from_zero_checkpoint(str(target), tag=name)
    states = torch.load(target / name / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return states["module"]


def load_weights(run_dir: str | Path, encoder: nn.Module, decoder: nn.Module) -> int:
    """Load the latest checkpoint's weights into plain modules (no engines, one process). Returns the step."""
    target = latest_dir(run_dir)
    meta = load_meta(run_dir)
    assert target is not None
    for name in meta["engines"]:
        state = {k: v.float() for k, v in _engine_state_dict(target, name, meta["zero_stages"][name]).items()}
        if name == "joint":
            for prefix, module in (("encoder.", encoder), ("decoder.", decoder)):
                module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        else:
            {"encoder": encoder, "decoder": decoder}[name].load_state_dict(state)
    return int(meta["step"])
