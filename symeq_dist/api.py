"""The library API: train, sample and evaluate a run as plain calls. `symeq_dist.cli` and `demo` are thin callers.

    from symeq_dist import api
    from symeq_dist.config import load_config
    api.train(load_config("configs/debug_cpu.yaml", ["train.steps=40"]))
    api.sample(api.SampleRequest(run_dir=Path("runs/debug"), mode="limiting", steps=1000, num=64, out=Path("g.png")))

Wiring only: configs in, pieces built and handed to the trainer or the evaluator. No training logic here.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from symeq_dist import sampling
from symeq_dist.config import (
    IMPLICIT_PRIORS,
    ConfigError,
    RunConfig,
    config_from_dict,
    dump_config,
    load_config,
    parse_overrides,
)
from symeq_dist.data import build_eval_batches, build_train_stream, load_manifest, pixel_marginal, to_float
from symeq_dist.data.labelled import LabelledPool
from symeq_dist.eval.export import write_samples
from symeq_dist.eval.model import load_trained, with_prior
from symeq_dist.game import build_game
from symeq_dist.models import build_players
from symeq_dist.models.layers import set_x_offset
from symeq_dist.priors import StreamSpec, build_prior
from symeq_dist.runtime import checkpoint, dist
from symeq_dist.runtime.engines import build_engines
from symeq_dist.runtime.monitor import Monitor, setup_logging
from symeq_dist.train.drills import FAULT_ENV, FaultPlan
from symeq_dist.train.preemption import PREEMPTED_FILE
from symeq_dist.train.state import make_generators
from symeq_dist.train.trainer import Trainer

log = logging.getLogger("symeq")

# Keys a resumed run may change; anything else must match the checkpoint (no silent change of a run).
RESUMABLE_CHANGES = ("resume", "train.steps", "monitor.", "checkpoint.", "fault.")


# ---------------------------------------------------------------- train
def load_run_config(path: str | Path | None, overrides: list[str]) -> RunConfig:
    """The config of `symeq train PATH OVERRIDES`: YAML + overrides for a new run; for `resume=true`, the run's
    own stored config with the explicit overrides applied (only `RESUMABLE_CHANGES` may differ from it).

    The run directory is where the run is, never compared: `run_dir` from the overrides, else the YAML's; a
    config file that sits in a run directory (`RUN_DIR/config.yaml`) resumes that directory wherever it is.

    Raises:
        ConfigError: a bad key or value, or an override that would change a resumed run's fixed settings.
        CheckpointError: resume=true but the run directory holds no readable checkpoint.
    """
    cfg = load_config(path, overrides)
    explicit = _flatten(parse_overrides(overrides))
    run_dir = Path(cfg.run_dir)
    if path is not None and "run_dir" not in explicit and (Path(path).parent / "checkpoints").is_dir():
        run_dir = Path(path).parent  # RUN_DIR/config.yaml: the run is where its config is
    run_dir = run_dir.resolve()
    if not cfg.resume:
        return replace(cfg, run_dir=str(run_dir))
    stored = checkpoint.load_meta(run_dir)["config"]
    asked = {k: v for k, v in explicit.items() if k not in ("run_dir", "resume")}
    base = config_from_dict(stored).to_dict()
    resumed = config_from_dict(_nested({**_flatten(base), **asked}))
    old, new = _flatten(base), _flatten(resumed.to_dict())
    fixed = [k for k in sorted(new) if old.get(k) != new[k] and not k.startswith(RESUMABLE_CHANGES)]
    if fixed:
        diff = "; ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in fixed)
        raise ConfigError(f"{diff}: cannot change on resume (the checkpoint's run was trained with it); only "
                          "train.steps, monitor.*, checkpoint.* and fault.* can. Start a new run_dir to change it.")
    if path is not None and not (Path(path).parent / "checkpoints").is_dir():
        ignored = [k for k, v in _flatten(load_config(path, []).to_dict()).items()
                   if k not in ("run_dir", "resume") and k not in asked and old.get(k) != v]
        if ignored:
            log.info("resuming %s with its stored config; %s differs in %s (ignored: pass them as overrides to "
                     "change what may change)", run_dir, path, ", ".join(ignored[:8]))
    return replace(resumed, run_dir=str(run_dir), resume=True)


def check_resume_config(cfg: RunConfig, stored: dict[str, Any]) -> None:
    """Refuse to resume with a config that differs from the checkpoint's outside `RESUMABLE_CHANGES` (the run
    directory and `resume` excepted: they say where and how, not what)."""
    old, new = _flatten(config_from_dict(stored).to_dict()), _flatten(cfg.to_dict())
    changed = [k for k in _changed_keys(old, new)
               if not k.startswith(RESUMABLE_CHANGES) and k not in ("run_dir", "resume")]
    if changed:
        diff = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ConfigError(f"{diff}: cannot change on resume (the checkpoint's run was trained with it); only "
                          "train.steps, monitor.*, checkpoint.* and fault.* can. Start a new run_dir to change it.")


def _init_from(cfg: RunConfig, players: Any) -> None:
    """train.init_from: both players start from the trained (not averaged) weights of another run's latest
    checkpoint; the model configs must match."""
    source = Path(cfg.train.init_from)
    stored = config_from_dict(checkpoint.load_meta(source)["config"]).to_dict()["model"]
    old, new = _flatten(stored), _flatten(cfg.to_dict()["model"])
    changed = _changed_keys(old, new)
    if changed:
        diff = "; ".join(f"model.{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in changed)
        raise ConfigError(f"train.init_from={source}: its model differs from this run's ({diff}); set the same model "
                          "keys (its config.yaml has them) or start from scratch")
    step, _ = checkpoint.load_weights(source, players.encoder, players.decoder, ema=False)
    log.info("players start from %s at its step %d (optimisers, data order and RNG start fresh)", source, step)


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Sorted keys of two flattened configs whose values differ (a key missing on one side counts)."""
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _write_run_info(cfg: RunConfig, argv: list[str]) -> None:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    (run_dir / "command.txt").write_text(f"{' '.join(['symeq', *argv])}\ncommit {commit or 'unknown'}\n")


def _check_data(cfg: RunConfig) -> None:
    manifest = load_manifest(cfg.data.shards)
    if manifest["image_shape"] is None:
        raise ConfigError(f"data.shards: {cfg.data.shards} holds latent codes (`symeq prior codes`), not images; "
                          "point data.shards at image shards, and latent shards at prior.shards with prior.kind=shards")
    shape = tuple(manifest["image_shape"])
    if shape != cfg.model.image_shape:
        raise ConfigError(f"model.image_shape: {cfg.model.image_shape} does not match the shards' "
                          f"{shape} ({cfg.data.shards}/manifest.json); set model.image_shape={list(shape)}")


def build_trainer(cfg: RunConfig, info: dist.DistInfo, argv: list[str] | None = None) -> Trainer:
    """Build every piece of a run (players, prior, game, engines, stream, monitor); restore it when resuming."""
    _check_data(cfg)
    if cfg.resume:  # before anything is built: a mismatching model would fail deep inside DeepSpeed's load
        check_resume_config(cfg, checkpoint.load_meta(cfg.run_dir)["config"])
    elif checkpoint.latest_dir(cfg.run_dir) is not None:
        raise ConfigError(f"run_dir {cfg.run_dir} already holds a checkpoint; pass resume=true to continue "
                          "it (`symeq resume RUN_DIR`) or choose another run_dir (nothing is overwritten)")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    players = build_players(cfg.model)
    if cfg.model.x_offset == "data_marginal" and not cfg.resume:  # a resumed run loads it with the weights
        set_x_offset(players.decoder, pixel_marginal(cfg.data))
    if cfg.train.init_from and not cfg.resume:
        _init_from(cfg, players)
    micro = cfg.micro_batch_size(info.world_size)
    prior = build_prior(cfg.prior, players.decoder, device=info.device,
                        stream=StreamSpec(seed=cfg.seed, rank=info.rank, world_size=info.world_size, batch_size=micro))
    if cfg.prior.kind in IMPLICIT_PRIORS:
        log.info("prior: %s", prior.source)
    game = build_game(cfg.game, players, prior)
    for name, module in players.items():  # counted before ZeRO-3 partitions the parameters
        log.info("%s: %s parameters", name, f"{sum(p.numel() for p in module.parameters()):,}")
    engines = build_engines(game.modules, cfg, info)
    log.info("global batch %d = micro %d x accumulation %d x world %d", cfg.train.batch_size, micro,
             cfg.train.grad_accumulation, info.world_size)
    stream = build_train_stream(cfg.data, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                                batch_size=micro)
    eval_images = next(iter(build_eval_batches(cfg.data, split=cfg.data.eval_split,
                                               batch_size=cfg.monitor.num_grid)))["image"]
    labelled = None
    if cfg.data.labels_per_class or cfg.data.labelled_fraction:
        cfg.labelled_micro_batch_size(info.world_size)  # divisible, or the error that names a multiple
        observed = "attributes" if getattr(cfg.model, "label", None) == "attributes" else "maps"
        labelled = LabelledPool(cfg.data.shards, cfg.data.split, per_class=cfg.data.labels_per_class,
                                fraction=cfg.data.labelled_fraction, observed=observed, seed=cfg.seed, rank=info.rank)
        top = players.decoder.latent_names[0]
        if labelled.num_classes != players.decoder.latent_shapes[top][0]:
            raise ConfigError(f"model.num_classes={players.decoder.latent_shapes[top][0]}: the labels of "
                              f"{cfg.data.shards} have {labelled.num_classes} "
                              f"{ {'maps': 'label-map classes'}.get(labelled.observed, labelled.observed)}; set "
                              f"model.num_classes={labelled.num_classes}")
        log.info("labelled pool: %s, %d labelled rows per step", labelled.description, cfg.data.labelled_batch_size)
    trainer = Trainer(cfg, info, players=players, game=game, engines=engines, prior=prior, stream=stream,
                      eval_images=eval_images, monitor=Monitor(Path(cfg.run_dir), enabled=info.is_main),
                      faults=FaultPlan.parse(os.environ.get(FAULT_ENV, "")), labelled=labelled)
    if cfg.resume:
        try:
            rank_state, _ = checkpoint.load(cfg.run_dir, engines, info)
        except Exception:
            trainer.close()
            raise
        trainer.load_rank_state(rank_state)
        if trainer.ema is not None:  # the averages of the checkpoint's weights.pt, sliced for this layout
            trainer.ema.load_full(checkpoint.read_weights(checkpoint.latest_dir(cfg.run_dir))["ema"])
        log.info("resumed %s at step %d", cfg.run_dir, trainer.state.step)
    if info.is_main:  # every check passed: only now the run directory records this start
        _write_run_info(cfg, argv or [])
        (Path(cfg.run_dir) / PREEMPTED_FILE).unlink(missing_ok=True)
    return trainer


def train(cfg: RunConfig, argv: list[str] | None = None) -> dict[str, float]:
    """Train (or resume) one run in this process; collective with the other ranks. Returns the last logged
    scalars (rank-averaged)."""
    info = dist.init(timeout_s=cfg.fault.collective_timeout_s)
    setup_logging(info.rank)
    log.info("accelerator %s (%s), %d process(es)", info.device, dist.backend(), info.world_size)
    trainer = build_trainer(cfg, info, argv)
    try:
        return trainer.train()
    finally:
        trainer.close()


# ---------------------------------------------------------------- sample
@dataclass(frozen=True)
class SampleRequest:
    run_dir: Path
    mode: str = "random"
    """random (z ~ prior, decode) or limiting (the chain x -> z ~ q -> x ~ p)."""
    steps: int = 1000
    """Limiting-chain steps."""
    num: int = 64
    out: Path = Path("grid.png")
    seed: int = 0
    format: str = "grid"
    """grid (one PNG), png-dir (one PNG per sample) or npz (arr_0: uint8 (N, H, W, C)); see eval/export.py."""
    batch_size: int = 500
    """Samples generated at once (memory stays bounded whatever `num` is)."""
    prior: Path | None = None
    """Random codes from this prior instead of the run's own: a `symeq prior train` run or a latent shard set."""


@dataclass(frozen=True)
class SampleResult:
    path: Path
    num: int
    step: int
    """The training step of the checkpoint the samples come from."""


def sample(req: SampleRequest) -> SampleResult:
    """Random-code or limiting-chain samples from a run's latest checkpoint, written in `req.format`."""
    from tqdm import tqdm

    model = load_trained(req.run_dir)  # on the accelerator when there is one
    if req.prior is not None:
        model = with_prior(model, req.prior)
    cfg, device = model.cfg, model.device
    gen = make_generators(req.seed, 0, device)["grid"]
    sizes = [min(req.batch_size, req.num - start) for start in range(0, req.num, req.batch_size)]
    work = len(sizes) * (req.steps if req.mode == "limiting" else 1)
    bar = tqdm(total=work, desc=f"{req.mode} samples", unit="step", disable=work < 2)

    def chunks() -> Iterator[torch.Tensor]:
        for num in sizes:
            if req.mode == "random":
                yield sampling.random_code(model.decoder, model.prior, num, gen, device)
                bar.update(1)
                continue
            data = _eval_images(cfg, num)
            x = sampling.init_chain(cfg.sampling.chain_init, decoder=model.decoder, prior=model.prior, num=num,
                                    generator=gen, device=device, image_shape=cfg.model.image_shape,
                                    data=None if data is None else data.to(device))
            x = sampling.run_chain(model.encoder, model.decoder, x, req.steps, gen, on_step=lambda _: bar.update(1))
            yield sampling.chain_output(model.encoder, model.decoder, x, gen)

    with bar:
        count = write_samples(chunks(), req.out, req.format)
    return SampleResult(path=req.out, num=count, step=model.step)


def _eval_images(cfg: RunConfig, num: int) -> torch.Tensor | None:
    if cfg.sampling.chain_init != "data":
        return None
    batch = next(iter(build_eval_batches(cfg.data, split=cfg.data.eval_split, batch_size=num)))
    return to_float(batch["image"], cfg.data)


# ---------------------------------------------------------------- evaluate
def evaluate(opts: Any) -> dict[str, Any]:
    """`symeq eval`: the report of a run's latest checkpoint (`symeq_dist.eval.run.EvalOptions` in)."""
    from symeq_dist.eval.run import evaluate as evaluate_run  # matplotlib and feature nets: only when asked

    return evaluate_run(opts)


# ---------------------------------------------------------------- priors (METHOD §7.5)
def train_prior(cfg: Any, argv: list[str] | None = None) -> dict[str, float]:
    """`symeq prior train`: a prior run (`priors.trainer`, accelerate) under the game's preemption contract: a
    signal in `fault.preempt_signals`' default set makes every process checkpoint after the step, and this
    raises `Preempted` (exit 75; <run_dir>/PREEMPTED for the sbatch script)."""
    from symeq_dist.config import FaultConfig
    from symeq_dist.priors.trainer import train_prior as run
    from symeq_dist.train.preemption import Preempted, PreemptWatcher, mark_preempted

    with PreemptWatcher(FaultConfig().preempt_signals) as watcher:
        last = run(cfg, argv, stop=lambda: watcher.signalled is not None)
    if "preempted_at" in last:
        step = int(last.pop("preempted_at"))
        if last.pop("main_process"):
            mark_preempted(cfg.run_dir, step)
        raise Preempted(step, watcher.signalled or "a preemption signal on another process")
    (Path(cfg.run_dir) / PREEMPTED_FILE).unlink(missing_ok=True)
    return last


def prior_codes(run_dir: Path, out: Path, *, splits: list[str] | None = None, seed: int = 0, ema: bool = True,
                samples_per_shard: int = 10000) -> dict[str, Any]:
    """`symeq prior codes`: a trained run's top-latent codes z ~ q(z_top | x) of `splits` (default: its data.split
    and data.eval_split) as a latent shard set in `out`; returns the manifest."""
    from symeq_dist.datasets.codes import write_code_set
    from symeq_dist.eval.prior import encode_split

    model = load_trained(run_dir, ema=ema)
    splits = splits or list(dict.fromkeys([model.cfg.data.split, model.cfg.data.eval_split]))
    codes = {split: encode_split(model, split, seed=seed) for split in splits}
    meta = {"source_run": str(Path(run_dir).resolve()), "source_step": model.step, "seed": seed,
            "weights": "averaged" if model.ema else "trained", "latent": model.decoder.latent_names[0]}
    return write_code_set(out, dataset="codes", codes=codes, family=model.decoder.top_family, meta=meta,
                          samples_per_shard=samples_per_shard)


def prior_sample(run_dir: Path, out: Path, *, num: int, split: str = "train", seed: int = 0, ema: bool = True,
                 samples_per_shard: int = 10000) -> dict[str, Any]:
    """`symeq prior sample`: `num` samples of a prior run as a latent shard set (split `split`) in `out`."""
    from symeq_dist.datasets.codes import write_code_set
    from symeq_dist.priors.trainer import draw_codes, load_prior

    prior = load_prior(run_dir, ema=ema)
    meta = {"source_prior": str(Path(run_dir).resolve()), "source_step": prior.step, "seed": seed,
            "weights": "averaged" if prior.ema else "trained"}
    return write_code_set(out, dataset="samples", codes={split: draw_codes(prior.model, num, seed)},
                          family=prior.family, meta=meta, samples_per_shard=samples_per_shard)
