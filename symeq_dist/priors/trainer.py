"""`symeq prior train`: one prior model over latent codes, trained with accelerate (METHOD §7.5).

A prior is one ordinary model, so it gets accelerate, not the game's pair of DeepSpeed engines: one process or
many (DDP; gloo on CPUs, NCCL on GPUs), started by `accelerate launch`, torchrun or `symeq-launch`. The pieces:

- data: the latent shard set through the game's own stream (`data.stream`): one global order, exactly B codes
  per process per step, resumable at any step (registered with accelerate as a checkpointed object);
- randomness: the diffusion time and noise come from torch's global generator, seeded per process
  (`set_seed(seed, device_specific=True)`) and saved and restored per process by accelerate's state;
- checkpoints: `accelerator.save_state` into `checkpoints/step_N/state/` (model, optimizer, every process's RNG,
  the stream, the weight averages, the step), then `weights.pt` (the prior's plain and averaged weights, for
  `prior.kind=model` and `symeq prior sample`), then meta.json and the atomic `latest` pointer
  (`runtime.ckpt_dirs`): a checkpoint is complete or invisible. Resume with the same number of processes
  continues bitwise; with another number the stream continues its order, the noise draws differ;
- monitoring: accelerate's TensorBoard tracker under `<run_dir>/tb`, a progress bar on the main process.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from symeq_dist.config import ConfigError, PriorRunConfig, config_from_dict, dump_config, load_config, with_overrides
from symeq_dist.data import load_manifest
from symeq_dist.data.stream import iter_eval_batches, open_train_stream
from symeq_dist.errors import InputError
from symeq_dist.priors.models import PriorModel, build_prior_model
from symeq_dist.runtime.ckpt_dirs import CheckpointError, latest_dir, publish, step_dir

log = logging.getLogger("symeq.prior")
WEIGHTS_FILE = "weights.pt"


def code_schema(shards: str | Path) -> tuple[tuple[int, ...], str]:
    """(shape, family) of a latent shard set's codes; an error naming the fix for an image set."""
    manifest = load_manifest(shards)
    code = manifest.get("code")
    if not code:
        raise InputError(f"{shards} holds images, not latent codes: write codes with `symeq prior codes RUN --out DIR` "
                         "(or `symeq prior sample`) and point data.shards there")
    return tuple(code["shape"]), code["family"]


def build_model(cfg: PriorRunConfig, shape: tuple[int, ...], family: str) -> PriorModel:
    m = cfg.model
    options: dict[str, Any] = {"hidden": m.hidden, "depth": m.depth}
    if m.kind == "diffusion":
        options.update(timesteps=m.timesteps, sample_steps=m.sample_steps)
    try:
        return build_prior_model(m.kind, shape, family, **options)
    except ValueError as err:
        raise ConfigError(f"model.kind: {err}") from None


class Averages:
    """fp32 exponential moving averages of a module's parameters and buffers (identical on every DDP process).

    The decay of update n is min(decay, (1 + n) / (10 + n)), the usual warm-up of diffusion training: a plain
    decay of 0.999 still holds 37% of the random initial weights after 1000 updates."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay, self.module, self.updates = decay, module, 0
        self.values = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for key, value in self.module.state_dict().items():
            if value.is_floating_point():
                self.values[key].lerp_(value.float(), 1.0 - decay)
            else:
                self.values[key].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "values": {k: v.clone() for k, v in self.values.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.values = {k: v.float().clone() for k, v in state["values"].items()}


@dataclass
class Progress:
    """The step counter, checkpointed with accelerate's registered objects."""

    step: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def first_codes(shards: str | Path, split: str, num: int) -> Tensor:
    """The first `num` codes (or all, if fewer) of `split` of a latent shard set, in shard order: the diffusion
    prior's standardisation, a shards prior's pool for grids and chains, `symeq prior eval`'s reference."""
    shards = Path(shards)
    manifest = load_manifest(shards)
    if split not in manifest["splits"]:
        raise InputError(f"{shards} has no split {split!r} (it has {sorted(manifest['splits'])}); pick one of them")
    chunks, count = [], 0
    for batch in iter_eval_batches(shards, manifest, split=split, batch_size=1000):
        chunks.append(batch["code"])
        count += len(chunks[-1])
        if count >= num:
            break
    return torch.cat(chunks)[:num]


def held_out_loss(model: PriorModel, cfg: PriorRunConfig, device: torch.device) -> float:
    """Mean loss over the first `monitor.eval_batches` batches of the held-out split, with fixed noise."""
    manifest = load_manifest(cfg.data.shards)
    if cfg.data.eval_split not in manifest["splits"]:
        return math.nan
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    losses = []
    batches = iter_eval_batches(Path(cfg.data.shards), manifest, split=cfg.data.eval_split, batch_size=256)
    with torch.no_grad():
        for _, batch in zip(range(cfg.monitor.eval_batches), batches, strict=False):
            losses.append(float(model.loss(batch["code"].to(device), generator=gen)))
    return sum(losses) / max(1, len(losses))


def load_prior_config(path: str | Path | None, overrides: list[str]) -> PriorRunConfig:
    """`symeq prior train PATH OVERRIDES`, or (path None, `run_dir=` and `resume=true` among the overrides) the
    run's stored config with the overrides applied; what may change on resume is checked in `train_prior`."""
    if path is not None:
        return load_config(path, overrides, cls=PriorRunConfig)
    run_dir = next(o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("run_dir="))
    target = latest_dir(run_dir)
    if target is None:
        raise CheckpointError(f"{Path(run_dir) / 'checkpoints'} holds no prior checkpoint to resume")
    stored = json.loads((target / "meta.json").read_text())["config"]
    return config_from_dict(with_overrides(stored, overrides), cls=PriorRunConfig)


def train_prior(cfg: PriorRunConfig, argv: list[str] | None = None,
                stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Train (or resume) a prior run in this process; collective with the other processes. Returns the last
    logged scalars, plus "preempted_at" (and "main_process") when `stop` (this process was signalled; asked after
    every step, the processes agree) ended the run early after a checkpoint (`api.train_prior`: exit 75)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm import tqdm

    run_dir = Path(cfg.run_dir).resolve()
    latest = latest_dir(run_dir)
    if cfg.resume and latest is None:
        raise CheckpointError(f"resume=true but {run_dir} holds no checkpoint; drop resume=true to start it")
    if not cfg.resume and latest is not None:
        raise ConfigError(f"run_dir {run_dir} already holds a checkpoint; pass resume=true to continue it "
                          "(`symeq prior resume RUN_DIR`) or choose another run_dir (nothing is overwritten)")
    if cfg.resume:
        _check_resume(cfg, json.loads((latest / "meta.json").read_text())["config"])
    shape, family = code_schema(cfg.data.shards)
    # cpu=True on a machine without CUDA: only then does accelerate take torchrun's ranks as a gloo process group
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with="tensorboard",
                              project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)))
    set_seed(cfg.seed)  # the same initial weights on every process
    model = build_model(cfg, shape, family)
    if cfg.model.kind == "diffusion" and cfg.model.normalize and not cfg.resume:
        model.set_data_stats(first_codes(cfg.data.shards, cfg.data.split, 50000))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    averages = Averages(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    world, rank = accelerator.num_processes, accelerator.process_index
    stream = open_train_stream(Path(cfg.data.shards), load_manifest(cfg.data.shards), cfg.data, seed=cfg.seed,
                               rank=rank, world_size=world, batch_size=cfg.micro_batch_size(world))
    progress = Progress()
    accelerator.register_for_checkpointing(stream, progress, *([averages] if averages else []))
    set_seed(cfg.seed, device_specific=True)  # per-process noise; accelerate's state saves and restores it
    if cfg.resume:
        accelerator.load_state(str(latest / "state"))
        log.info("resumed %s at step %d", run_dir, progress.step)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        (run_dir / "command.txt").write_text(" ".join(["symeq", "prior", *(argv or [])]) + "\n")
        log.info("prior %s over %s codes of shape %s: %s parameters; %d process(es), global batch %d",
                 cfg.model.kind, family, shape, f"{sum(p.numel() for p in model.parameters()):,}", world,
                 cfg.train.batch_size)
    # a resumed run drops the events its predecessor logged after the checkpoint (TensorBoard would show them twice)
    accelerator.init_trackers("tb", init_kwargs={"tensorboard": {"purge_step": progress.step + 1}}
                              if cfg.resume else {})
    last: dict[str, float] = {}
    total, seen, start = 0.0, 0, time.perf_counter()
    bar = tqdm(total=cfg.train.steps, initial=progress.step, desc="prior", unit="step",
               disable=not (cfg.monitor.progress and accelerator.is_main_process))
    try:
        while progress.step < cfg.train.steps:
            z = next(stream)["code"].to(accelerator.device)
            loss = wrapped(z)
            accelerator.backward(loss)
            if cfg.train.grad_clip:
                accelerator.clip_grad_norm_(wrapped.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if averages is not None:
                averages.update()
            progress.step += 1
            total, seen = total + loss.detach(), seen + 1
            bar.update(1)
            step, end = progress.step, progress.step == cfg.train.steps
            if step % cfg.monitor.log_every == 0 or end:
                mean = float(accelerator.reduce(total / seen, reduction="mean"))
                if not math.isfinite(mean):  # nothing is saved from here: the last checkpoint stays the latest
                    raise FloatingPointError(f"the prior's training loss is {mean} at step {step}; train it again "
                                             "(a new run_dir) with a lower train.lr or a train.grad_clip")
                last = {"train/loss": mean, "train/codes_per_s": seen * cfg.train.batch_size /
                        (time.perf_counter() - start)}
                accelerator.log(last, step=step)
                bar.set_postfix(loss=f"{mean:.4f}")
                total, seen, start = 0.0, 0, time.perf_counter()
            if step % cfg.monitor.eval_every == 0 or end:
                last["eval/loss"] = held_out_loss(model, cfg, accelerator.device)
                accelerator.log({"eval/loss": last["eval/loss"]}, step=step)
            saved = step % cfg.checkpoint.every == 0 or end
            if saved:
                save(accelerator, cfg, model, averages, shape, family, step)
            if stop is not None and not end and _anyone(accelerator, stop()):
                if not saved:
                    save(accelerator, cfg, model, averages, shape, family, step)
                return {**last, "preempted_at": float(step), "main_process": float(accelerator.is_main_process)}
    finally:
        bar.close()
        accelerator.end_training()
        stream.close()
    return last


def _anyone(accelerator: Any, flag: bool) -> bool:
    """Whether any process's flag is set (one tiny all-reduce; nothing with one process)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum") > 0)


def save(accelerator: Any, cfg: PriorRunConfig, model: PriorModel, averages: Averages | None,
         shape: tuple[int, ...], family: str, step: int) -> Path:
    """Collective: accelerate's full state, then the plain weights, then meta.json and `latest` (main process)."""
    target = step_dir(cfg.run_dir, step)
    if accelerator.is_main_process and target.exists():  # a partial directory left by a killed run
        shutil.rmtree(target)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(target / "state"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        weights = {"prior": {k: v.detach().cpu().float() for k, v in model.state_dict().items()}}
        if averages is not None:
            weights["ema"] = averages.state_dict()["values"]
        tmp = target / (WEIGHTS_FILE + ".tmp")
        torch.save(weights, tmp)
        tmp.replace(target / WEIGHTS_FILE)
        meta = {"step": step, "world_size": accelerator.num_processes, "kind": cfg.model.kind,
                "shape": list(shape), "family": family, "config": cfg.to_dict()}
        publish(cfg.run_dir, target, json.dumps(meta, indent=1).encode(), cfg.checkpoint.keep_last)
    accelerator.wait_for_everyone()
    return target


def _check_resume(cfg: PriorRunConfig, stored: dict[str, Any]) -> None:
    now = cfg.to_dict()
    changed = [f"{section}.{key}" for section in ("model", "data", "train") for key in now[section]
               if key != "steps" and stored.get(section, {}).get(key) != now[section][key]]
    changed += ["seed"] if stored.get("seed") != now["seed"] else []
    if changed:
        raise ConfigError(f"{', '.join(changed)}: cannot change on resume (the checkpoint's prior was trained with "
                          "it); only train.steps, monitor.* and checkpoint.* can. Start a new run_dir to change it.")


@dataclass(frozen=True)
class TrainedPrior:
    """A prior run's model for sampling: frozen, in eval mode."""

    model: PriorModel
    cfg: PriorRunConfig
    step: int
    shape: tuple[int, ...]
    family: str
    ema: bool


def load_prior(run_dir: str | Path, *, ema: bool = True, device: torch.device | None = None,
               sample_steps: int = 0) -> TrainedPrior:
    """The prior model of a run's latest checkpoint (its averaged weights when it keeps them and `ema`); a diffusion
    prior draws with `sample_steps` DDIM steps instead of its run's own when that is not 0.

    Raises:
        ConfigError: sample_steps for a prior without them, or above the noise levels it was trained with.
    """
    target = latest_dir(run_dir)
    if target is None:
        raise CheckpointError(f"{Path(run_dir) / 'checkpoints'} holds no prior checkpoint; train one first "
                              "(symeq prior train CONFIG run_dir=...)")
    meta = json.loads((target / "meta.json").read_text())
    if "kind" not in meta or "family" not in meta:
        raise CheckpointError(f"{run_dir} is not a prior run (`symeq prior train`); a game run is not a prior")
    cfg = config_from_dict(meta["config"], cls=PriorRunConfig)
    shape, family = tuple(meta["shape"]), meta["family"]
    model = build_model(cfg, shape, family)
    weights = torch.load(target / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    use_ema = ema and "ema" in weights
    model.load_state_dict(weights["ema"] if use_ema else weights["prior"])
    model = model.to(device or torch.device("cpu")).eval().requires_grad_(False)
    if sample_steps:
        if not hasattr(model, "timesteps"):
            raise ConfigError(f"prior.sample_steps: {run_dir} is a {cfg.model.kind} prior, which has no sampling "
                              "steps; leave prior.sample_steps (symeq prior eval --sample-steps) at 0")
        if sample_steps > model.timesteps:
            raise ConfigError(f"prior.sample_steps: {sample_steps} is more than the {model.timesteps} noise levels "
                              f"{run_dir} was trained with")
        model.sample_steps = sample_steps
    return TrainedPrior(model=model, cfg=cfg, step=int(meta["step"]), shape=shape, family=family, ema=use_ema)


@torch.no_grad()
def draw_codes(model: PriorModel, num: int, seed: int, batch_size: int = 1000) -> np.ndarray:
    """`num` samples of a prior model (float32, on the CPU), in batches, from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    out = [model.sample(min(batch_size, num - start), gen, torch.device("cpu")).float().numpy()
           for start in range(0, num, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, *model.shape), np.float32)
