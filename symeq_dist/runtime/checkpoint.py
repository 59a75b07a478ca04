"""Checkpoints: both engines, every rank's train state, and an atomic `latest` pointer.

Layout (STYLE.md §3.3):

    <run_dir>/checkpoints/step_00000500/encoder/...      engine.save_checkpoint(step_dir, tag="encoder"), all ranks
    <run_dir>/checkpoints/step_00000500/decoder/...      (ELBO: a single "joint" engine)
    <run_dir>/checkpoints/step_00000500/rank_00000.pt    TrainState, RNG states, stream position, chain, MI EMAs
    <run_dir>/checkpoints/step_00000500/weights.pt       {"encoder": state dict, "decoder": state dict, "ema"?}, fp32
    <run_dir>/checkpoints/step_00000500/meta.json        step, world size, engine names, config (rank 0, last)
    <run_dir>/checkpoints/step_00000500/universal/<engine>/   DeepSpeed universal form, made on the first resume
                                                               on another number of ranks (ZeRO 1-3 engines only)
    <run_dir>/checkpoints/latest                         "step_00000500", replaced by atomic rename after a barrier

A checkpoint is complete or invisible: `latest` only ever names a directory whose every file was
written. The last `keep_last` complete checkpoints are kept. `load` resumes on the same or on another
number of ranks (docs/resume.md). Must not import game.

Loading runs no pickled code from the project's own files: `rank_*.pt` and `weights.pt` hold tensors and
plain types and are read with `torch.load(weights_only=True)`; `symeq sample` and `symeq eval` read only
`weights.pt` and `meta.json`. Resuming also loads DeepSpeed's engine files (`encoder/`, `decoder/`, `joint/`,
`universal/`), which DeepSpeed unpickles: resume only runs you trust.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from deepspeed.checkpoint import ds_to_universal
from torch import nn

from symeq_dist.runtime.ckpt_dirs import (
    CheckpointError,
    ckpt_root,
    complete_steps,
    latest_dir,
    publish,
    step_dir,
)
from symeq_dist.runtime.dist import DistInfo, barrier, broadcast_object
from symeq_dist.runtime.engines import Engines, consolidated_weights, player_state

log = logging.getLogger(__name__)
WEIGHTS_FILE = "weights.pt"


def save(run_dir: str | Path, step: int, engines: Engines, rank_state: dict[str, Any], *,
         meta: dict[str, Any], info: DistInfo, keep_last: int,
         ema: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Collective: every rank must call it. Returns the new checkpoint directory.

    `ema`: the players' averaged weights (`runtime.ema.EMA.full`), stored in weights.pt under "ema".
    """
    target = step_dir(run_dir, step)
    if info.is_main and target.exists():  # a partial directory left by a killed run, never `latest`
        shutil.rmtree(target)
    barrier(info)
    for name, engine in engines.items():
        engine.save_checkpoint(str(target), tag=name, client_state={"step": step}, save_latest=False)
    weights: dict[str, Any] = player_state({name: consolidated_weights(engine) for name, engine in engines.items()})
    if ema is not None:
        weights["ema"] = ema
    target.mkdir(parents=True, exist_ok=True)
    _atomic_save(rank_state, target / f"rank_{info.rank:05d}.pt")
    barrier(info)
    if info.is_main:
        _atomic_save(weights, target / WEIGHTS_FILE)
        full_meta = {**meta, "step": step, "world_size": info.world_size,
                     "engines": [name for name, _ in engines.items()],
                     "zero_stages": {name: int(e.zero_optimization_stage()) for name, e in engines.items()}}
        publish(run_dir, target, json.dumps(full_meta, indent=1).encode(), keep_last)
    barrier(info)
    log.info("checkpoint %s written", target)
    return target


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(run_dir: str | Path, engines: Engines, info: DistInfo) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective: restore both engines (weights and optimiser states); return (this rank's state, meta).

    On the number of ranks that wrote the checkpoint, every engine loads DeepSpeed's own files and the
    rank state is this rank's `rank_XXXXX.pt` as written (a bitwise resume).

    On another number of ranks (meta["world_size"] != info.world_size) nothing is reset:
      - engines whose directory holds ZeRO partitions (`*optim_states.pt`: stages 1-3, any precision) are
        converted once by rank 0 into DeepSpeed's universal checkpoint (one fp32 weight, exp_avg,
        exp_avg_sq and step per parameter, under `<step>/universal/<engine>/`) and loaded from it,
        partitioned for this world size; ZeRO-0 engines keep the full optimiser state in
        `mp_rank_00_model_states.pt` and load it as is.
      - the rank state is rebuilt from all old `rank_XXXXX.pt` files, in the format `Trainer.rank_state`
        writes: "train", "stream" and "mi" from old rank 0 (the stream continues the epoch order on the
        new layout itself), except the stream's count of skipped bad samples: new rank 0 gets the old ranks'
        total and the others 0, so the count summed over ranks (data/skipped) stays global and exact;
        "chain" = the old ranks' chains concatenated in rank order (old rank 0's rows first), of which new
        rank r takes rows [r*n, (r+1)*n) with n = max(1, num_chains // world_size), wrapping around when
        there are fewer rows; "gens" and "torch_rng" are None (the trainer re-derives
        the per-rank generators from (seed, rank, step)).
    meta is returned as written (its "world_size" is the old one).

    Raises:
        CheckpointError: no checkpoint, other engines than this run builds, or a missing or unreadable
            file (rank state, DeepSpeed shard); the message names the file and the fix.
    """
    target = latest_dir(run_dir)
    if target is None:
        raise CheckpointError(f"resume=true but {ckpt_root(run_dir)} holds no checkpoint; "
                              "drop resume=true to start a new run")
    meta = _read_meta(target)
    names = [name for name, _ in engines.items()]
    if meta["engines"] != names:
        raise CheckpointError(f"{target} holds engines {meta['engines']}, this run builds {names}; "
                              "game.kind must match the run being resumed")
    _check_stages(target, meta, engines)
    _check_engine_files(target, names)
    old_world = int(meta["world_size"])
    if old_world == info.world_size:
        for name, engine in engines.items():
            _load_engine(engine, target, name, target)
        return _read_rank_state(target, info.rank, old_world), meta
    old_states = [_read_rank_state(target, rank, old_world) for rank in range(old_world)]
    rank_state = reshard_rank_states(old_states, rank=info.rank, world_size=info.world_size,
                                     num_chains=int(meta["config"]["sampling"]["num_chains"]))
    how = _load_resharded(target, engines, info, old_world)
    log.info("resumed %s (written by %d ranks) on %d ranks: re-sharded %s; chains redistributed "
             "(%d rows per rank); per-rank RNG streams re-derived", target, old_world, info.world_size,
             ", ".join(f"{name} by {way}" for name, way in how.items()), rank_state["chain"].shape[0])
    return rank_state, meta


def _load_engine(engine: Any, folder: Path, name: str, target: Path) -> None:
    """engine.load_checkpoint(folder, tag=name) with its optimiser state; `target` is the step directory."""
    path, _ = engine.load_checkpoint(str(folder), tag=name, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no '{name}' engine checkpoint in {folder}; point "
                              f"{target.parent / 'latest'} at an older complete step_* directory")


def _check_engine_files(target: Path, names: list[str]) -> None:
    """Every DeepSpeed file of the engines is a complete torch archive (a truncated copy fails deep inside
    DeepSpeed with "PytorchStreamReader failed reading zip archive", naming no file)."""
    for name in names:
        for path in sorted((target / name).rglob("*.pt")):
            if not zipfile.is_zipfile(path):
                raise CheckpointError(f"{path} is truncated or corrupt (not a complete torch file); restore it, or "
                                      f"point {target.parent / 'latest'} at an older step_* directory "
                                      f"({complete_steps(target.parent.parent, target)})")


def _check_stages(target: Path, meta: dict[str, Any], engines: Engines) -> None:
    # Another stage would find no (or other) optimiser partitions and DeepSpeed would silently restart Adam.
    saved = meta.get("zero_stages", {})
    for name, engine in engines.items():
        stage = int(engine.zero_optimization_stage())
        if name in saved and int(saved[name]) != stage:
            raise CheckpointError(f"{target} holds the {name} engine at ZeRO stage {saved[name]}, this run builds "
                                  f"stage {stage}; resume with stage {saved[name]} (engines.{name}.zero_stage or "
                                  "ds_config.json), the optimizer state would be lost otherwise")


def _read_rank_state(target: Path, rank: int, old_world: int) -> dict[str, Any]:
    path = target / f"rank_{rank:05d}.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain types only
    except Exception as err:  # missing, truncated, not a torch file, or pickled code: all mean the same fix
        raise CheckpointError(
            f"cannot read {path} ({type(err).__name__}: {err}); the checkpoint was written by {old_world} "
            f"ranks and needs all their rank_*.pt files: restore it, or point {target.parent}/latest at an "
            "older complete step_* directory") from err


def reshard_rank_states(old: list[dict[str, Any]], *, rank: int, world_size: int,
                        num_chains: int) -> dict[str, Any]:
    """New rank `rank`'s state (of `world_size`) from all old ranks' states (format: see `load`)."""
    steps = {state["train"]["step"] for state in old}
    if len(steps) != 1:
        raise CheckpointError(f"the old ranks' states disagree on the step ({sorted(steps)}); the checkpoint "
                              "is inconsistent: point checkpoints/latest at an older complete step_* directory")
    chains = torch.cat([state["chain"] for state in old])  # (sum of old rows, C, H, W), old rank order
    num = max(1, num_chains // world_size)
    rows = torch.arange(rank * num, (rank + 1) * num) % chains.shape[0]
    first = old[0]
    # Bad samples dropped so far by all old ranks: new rank 0 carries the total, so the ranks' sum stays global.
    skipped = sum(int(state["stream"].get("skipped", 0)) for state in old) if rank == 0 else 0
    # A streamed prior (prior.kind=shards) continues its order like the data; a buffered one refills.
    prior = first.get("prior")
    prior = {**prior, "skipped": 0} if prior and "batches" in prior else None
    return {"train": first["train"], "stream": {**first["stream"], "skipped": skipped},
            "chain": chains[rows].clone(), "mi": first["mi"], "gens": None, "torch_rng": None, "prior": prior,
            "labelled": None}  # the labelled draws restart from (seed, new rank)


def _load_resharded(target: Path, engines: Engines, info: DistInfo, old_world: int) -> dict[str, str]:
    """Load every engine written by `old_world` ranks; returns how each one was re-sharded."""
    partitioned = [name for name, _ in engines.items() if _shard_ranks(target / name)]
    error = None
    if info.is_main:
        try:
            for name in partitioned:
                _to_universal(target, name, old_world)
        except Exception as err:  # agreed below: the other ranks must not wait at a barrier forever
            error = err if isinstance(err, CheckpointError) else CheckpointError(
                f"converting {target / name} to a universal checkpoint failed ({type(err).__name__}: {err}); "
                f"resume with {old_world} ranks, or point {target.parent}/latest at an older step_* directory")
    error = broadcast_object(error, info)  # also the barrier: the universal files exist past this line
    if error is not None:
        raise error
    how = {}
    for name, engine in engines.items():
        if name in partitioned:
            _load_universal(engine, target, name)
            how[name] = f"universal checkpoint (ZeRO-{engine.zero_optimization_stage()})"
        else:  # ZeRO-0: the whole optimiser state is in mp_rank_00_model_states.pt, not partitioned
            _load_engine(engine, target, name, target)
            how[name] = "full optimizer state (ZeRO-0)"
    return how


_SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def _shard_ranks(engine_dir: Path) -> set[int]:
    """The data-parallel ranks whose ZeRO optimiser partition file is in `engine_dir` (empty at ZeRO-0)."""
    return {int(m.group(1)) for p in engine_dir.glob("*optim_states.pt") if (m := _SHARD.search(p.name))}


def _to_universal(target: Path, name: str, old_world: int) -> None:
    """Rank 0: DeepSpeed's ds_to_universal into <target>/universal/<name>, once, by atomic rename."""
    out = target / "universal" / name
    if out.is_dir():
        return
    missing = sorted(set(range(old_world)) - _shard_ranks(target / name))
    if missing:
        raise CheckpointError(f"{target / name} lacks the ZeRO optimizer partitions of ranks {missing} "
                              f"(zero_pp_rank_<r>_mp_rank_00_optim_states.pt); restore them, resume with "
                              f"{old_world} ranks, or point {target.parent}/latest at an older step_* directory")
    partial = out.with_name(f".{name}.partial{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(target / name), output_folder=str(partial), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # our engines are plain modules: no TP/PP info to add
    report = io.StringIO()
    with contextlib.redirect_stdout(report), contextlib.redirect_stderr(report):  # it prints and draws tqdm bars
        ds_to_universal.main(args)
    log.debug("ds_to_universal %s: %s", target / name, report.getvalue())
    (out.parent / "latest_universal").unlink(missing_ok=True)  # names the partial folder; tags are explicit
    os.replace(partial, out)


def _no_mpu_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("MPU is not provided")


def _load_universal(engine: Any, target: Path, name: str) -> None:
    """Load <target>/universal/<name> into an engine built without `checkpoint.load_universal`."""
    folder = target / "universal"
    # DeepSpeed reads this flag only inside load_checkpoint, so setting it for the call equals building the
    # engine with {"checkpoint": {"load_universal": true}}; it is put back so later saves/loads are plain.
    config = engine._config
    before, config.load_universal_checkpoint = config.load_universal_checkpoint, True
    deepspeed_log = logging.getLogger("DeepSpeed")
    deepspeed_log.addFilter(_no_mpu_warning)  # our engines have no tensor parallelism: tp size 1 is right
    try:
        _load_engine(engine, folder, name, target)
    finally:
        config.load_universal_checkpoint = before
        deepspeed_log.removeFilter(_no_mpu_warning)
    if engine.zero_optimization_stage() == 3:
        # ZeRO-3's universal loader gives every parameter group group 0's lr/betas/eps/weight_decay; the
        # joint ELBO engine has two groups (encoder, decoder): put back each group's own from the checkpoint.
        saved = torch.load(folder / name / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
        groups = saved["optimizer_state_dict"]["param_groups"]
        live = engine.optimizer.optimizer.param_groups
        if len(groups) != len(live):
            raise CheckpointError(f"{folder / name} has {len(groups)} optimizer parameter groups, this engine "
                                  f"{len(live)}; game.kind and the model must match the run being resumed")
        for group, old in zip(live, groups, strict=True):
            group.update({key: value for key, value in old.items() if key != "params"})


def checkpoint_dir(run_dir: str | Path, step: int | None = None) -> Path:
    """The complete checkpoint of `step`, or the latest one when `step` is None; an error naming what exists."""
    target = latest_dir(run_dir) if step is None else step_dir(run_dir, step)
    if target is None or not (target / "meta.json").is_file():
        steps = sorted(int(p.name[5:]) for p in ckpt_root(run_dir).glob("step_*") if (p / "meta.json").is_file())
        raise CheckpointError(
            f"{ckpt_root(run_dir)} holds no checkpoint; train the run first (symeq train CONFIG run_dir=...)"
            if target is None else f"{run_dir} has no complete checkpoint of step {step} (it has {steps or 'none'}); "
            "pass one of those to --step, or train with a larger checkpoint.keep_last to keep more")
    return target


def load_meta(run_dir: str | Path, step: int | None = None) -> dict[str, Any]:
    """meta.json of the latest checkpoint, or of `step` (step, world size, engines, resolved config)."""
    return _read_meta(checkpoint_dir(run_dir, step))


def _read_meta(target: Path) -> dict[str, Any]:
    path = target / "meta.json"
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or not {"step", "world_size", "engines", "config"} <= set(meta):
            raise ValueError("it lacks step, world_size, engines or config")
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not a checkpoint's meta.json ({err}); point {target.parent / 'latest'} at an "
                              f"older step_* directory ({complete_steps(target.parent.parent, target)})") from None
    return meta


def read_weights(target: Path) -> dict[str, dict[str, torch.Tensor]]:
    """`<step dir>/weights.pt`: player -> fp32 state dict, read with weights_only=True (no pickled code runs)."""
    return torch.load(Path(target) / WEIGHTS_FILE, map_location="cpu", weights_only=True)


def load_weights(run_dir: str | Path, encoder: nn.Module, decoder: nn.Module, *, ema: bool = True,
                 step: int | None = None) -> tuple[int, bool]:
    """Load `weights.pt` of the latest checkpoint (or of `step`) into plain modules (no engines, no DeepSpeed files,
    no pickled code: `weights_only=True`): the averaged weights when the run keeps them (`train.ema_decay`) and
    `ema`, else the trained ones. Returns (step, whether the averages were loaded).

    Raises:
        CheckpointError: no checkpoint, no `weights.pt` (written by an older symeq-dist), or a file that does
            not load or does not fit the modules; the message names the file and the fix.
    """
    target = checkpoint_dir(run_dir, step)
    meta = _read_meta(target)
    path = target / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint was written by an older symeq-dist. Resume the run "
                              f"for one step with this version (symeq train {Path(run_dir) / 'config.yaml'} "
                              f"resume=true train.steps={int(meta['step']) + 1}) to write it")
    try:
        weights = read_weights(target)
        use_ema = ema and "ema" in weights
        for name, module in (("encoder", encoder), ("decoder", decoder)):
            module.load_state_dict((weights["ema"] if use_ema else weights)[name])
    except Exception as err:
        raise CheckpointError(f"cannot load {path} into this run's players ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:300]}); point {target.parent}/latest at an older "
                              "complete step_* directory") from err
    return int(meta["step"]), use_ema
