"""The `symeq` command: wiring only (config -> dist -> pieces -> Trainer). No training logic here.

    symeq train configs/mnist_ladder.yaml train.steps=200 engines.decoder.lr=2e-4
    symeq sample runs/demo --mode limiting --steps 1000 --n 64 --out grid.png
    symeq shards mnist --out data_shards/mnist ; symeq shards verify data_shards/mnist
    symeq demo
    symeq eval train-features data_shards/mnist ; symeq eval runs/demo --n 10000 --chain-steps 1000
    symeq compare runs/symmetric runs/elbo
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from symeq_dist import checkpoint, dist, sampling
from symeq_dist.config import ConfigError, RunConfig, config_from_dict, dump_config, load_config
from symeq_dist.data import build_eval_batches, build_train_stream, load_manifest, to_float
from symeq_dist.data.commands import add_shards_parser, run_shards
from symeq_dist.engines import build_engines
from symeq_dist.faults import EXIT_REQUEUE, Preempted
from symeq_dist.models import build_players
from symeq_dist.monitor import Monitor, make_grid, save_png, setup_logging
from symeq_dist.prior import build_prior
from symeq_dist.trainer import Trainer, make_generators

log = logging.getLogger("symeq")

# Keys a resumed run may change; anything else must match the checkpoint (no silent change of a run).
RESUMABLE_CHANGES = ("resume", "train.steps", "monitor.", "checkpoint.", "fault.")


# ---------------------------------------------------------------- train
def _check_resume_config(cfg: RunConfig, stored: dict[str, Any]) -> None:
    old, new = _flatten(stored), _flatten(cfg.to_dict())
    changed = [k for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        diff = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ConfigError(f"resume: the config differs from the checkpoint's ({diff}); only train.steps, "
                          "monitor.*, checkpoint.* and fault.* may change on resume. Use the run's config.yaml.")


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
    shape = tuple(manifest["image_shape"])
    if shape != cfg.model.image_shape:
        raise ConfigError(f"model.image_shape: {cfg.model.image_shape} does not match the shards' "
                          f"{shape} ({cfg.data.shards}/manifest.json); set model.image_shape={list(shape)}")


def build_trainer(cfg: RunConfig, info: dist.DistInfo, argv: list[str] | None = None) -> Trainer:
    """Build every piece of a run (players, engines, stream, monitor) and restore it when resuming."""
    _check_data(cfg)
    if not cfg.resume and checkpoint.latest_dir(cfg.run_dir) is not None:
        raise ConfigError(f"run_dir {cfg.run_dir} already holds a checkpoint; pass resume=true to continue "
                          "it or choose another run_dir (nothing is overwritten)")
    if info.is_main:
        _write_run_info(cfg, argv or [])
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    encoder, decoder = build_players(cfg.model)
    prior = build_prior(decoder.top_family, decoder.latent_shapes[decoder.latent_names[0]])
    engines = build_engines(encoder, decoder, cfg, info)
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        log.info("%s: %s parameters", name, f"{sum(p.numel() for p in module.parameters()):,}")
    micro = cfg.micro_batch_size(info.world_size)
    log.info("global batch %d = micro %d x accumulation %d x world %d", cfg.train.batch_size, micro,
             cfg.train.grad_accumulation, info.world_size)
    stream = build_train_stream(cfg.data, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                                batch_size=micro)
    eval_images = next(iter(build_eval_batches(cfg.data, split=cfg.data.eval_split,
                                               batch_size=cfg.monitor.num_grid)))["image"]
    trainer = Trainer(cfg, info, engines, prior, stream, eval_images,
                      Monitor(Path(cfg.run_dir), enabled=info.is_main))
    if cfg.resume:
        try:
            rank_state, meta = checkpoint.load(cfg.run_dir, engines, info)
            _check_resume_config(cfg, meta["config"])
        except Exception:
            trainer.close()
            raise
        trainer.load_rank_state(rank_state)
        log.info("resumed at step %d", trainer.state.step)
    return trainer


def run_training(cfg: RunConfig, argv: list[str] | None = None) -> dict[str, float]:
    """Train (or resume) one run in this process; collective with the other ranks."""
    info = dist.init(timeout_s=cfg.fault.collective_timeout_s)
    setup_logging(info.rank)
    trainer = build_trainer(cfg, info, argv)
    try:
        return trainer.train()
    finally:
        trainer.close()


def _collective_failure(err: BaseException) -> bool:
    """A failed or timed-out collective (a peer died or hangs), as gloo and NCCL report it."""
    if isinstance(err, torch.distributed.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(m in text for m in ("gloo", "Gloo", "NCCL", "Connection closed",
                                                                     "Connection reset", "timed out"))


# ---------------------------------------------------------------- sample
@dataclass
class SampleArgs:
    run_dir: Path
    mode: str
    steps: int
    num: int
    out: Path
    seed: int


def run_sampling(args: SampleArgs) -> Path:
    """Random-code or limiting-chain samples from a run's latest checkpoint, as a PNG grid."""
    cfg = config_from_dict(checkpoint.load_meta(args.run_dir)["config"])
    encoder, decoder = build_players(cfg.model)
    checkpoint.load_weights(args.run_dir, encoder, decoder)
    encoder.eval(), decoder.eval()
    prior = build_prior(decoder.top_family, decoder.latent_shapes[decoder.latent_names[0]])
    gen = make_generators(args.seed, 0, torch.device("cpu"))["grid"]
    cpu = torch.device("cpu")
    if args.mode == "random":
        images = sampling.random_code(decoder, prior, args.num, gen, cpu)
    else:
        from tqdm import tqdm
        x = sampling.init_chain(cfg.sampling.chain_init, decoder=decoder, prior=prior, num=args.num,
                                generator=gen, device=cpu, image_shape=cfg.model.image_shape,
                                data=_eval_images(cfg, args.num))
        with tqdm(total=args.steps, desc="limiting chain", unit="step") as bar:
            x = sampling.run_chain(encoder, decoder, x, args.steps, gen, on_step=lambda _: bar.update(1))
        images = sampling.chain_output(encoder, decoder, x, gen)
    save_png(make_grid(images), args.out)
    return args.out


def _eval_images(cfg: RunConfig, num: int) -> torch.Tensor | None:
    if cfg.sampling.chain_init != "data":
        return None
    batch = next(iter(build_eval_batches(cfg.data, split=cfg.data.eval_split, batch_size=num)))
    return to_float(batch["image"], cfg.data)


# ---------------------------------------------------------------- argument parsing
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="symeq", description="Symmetric Equilibrium Learning of VAEs "
                                     "with one DeepSpeed engine per player.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train or resume a run", description="Train a run. Launch several "
                           "processes with `torchrun --nproc_per_node N -m symeq_dist.cli train ...`.")
    train.add_argument("config", type=Path, help="run config YAML (configs/*.yaml)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 "
                       "engines.decoder.lr=2e-4 resume=true")
    sample = sub.add_parser("sample", help="sample grids from a trained run")
    sample.add_argument("run_dir", type=Path)
    sample.add_argument("--mode", choices=["random", "limiting"], default="random",
                        help="random code (z ~ prior, decode) or the limiting chain x -> z -> x")
    sample.add_argument("--steps", type=int, default=1000, help="limiting-chain steps (default 1000)")
    sample.add_argument("--n", type=int, default=64, dest="num", help="number of samples")
    sample.add_argument("--out", type=Path, default=Path("grid.png"), help="PNG file to write")
    sample.add_argument("--seed", type=int, default=0)
    add_shards_parser(sub)
    sub.add_parser("demo", help="the main job: MNIST shards, a short symmetric run, sample grids")
    _eval_parsers(sub)
    return parser


def _eval_parsers(sub: Any) -> None:
    ev = sub.add_parser("eval", help="evaluate a run (FD/FID, consistency, MI, probe, t-SNE) -> <run_dir>/eval/",
                        description="symeq eval RUN_DIR [options]   |   symeq eval train-features SHARDS_DIR")
    ev.add_argument("run_dir", type=Path, help="a run directory, or the word train-features")
    ev.add_argument("shards", type=Path, nargs="?", help="with train-features: the shards to train the classifier on")
    ev.add_argument("--n", type=int, default=10_000, help="samples per generated set (default 10000)")
    ev.add_argument("--chain-steps", type=int, default=1000, help="limiting-chain steps (default 1000)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=500, help="images generated and embedded at once")
    ev.add_argument("--features", type=Path, default=None,
                    help="classifier checkpoint (default <shards>/classifier.pt); train-features: where to write it")
    ev.add_argument("--inception-weights", type=Path, default=None,
                    help="local pt_inception-2015-12-05-6726825d.pth for FID (never downloaded)")
    ev.add_argument("--tsne-points", type=int, default=2000, help="codes per set in the t-SNE figure")
    ev.add_argument("--epochs", type=int, default=5, help="train-features: classifier epochs")
    cmp = sub.add_parser("compare", help="put evaluated runs side by side (markdown table + plot)")
    cmp.add_argument("run_dirs", type=Path, nargs="+")
    cmp.add_argument("--out", type=Path, default=None, help="also write the table (.md) and a plot (.png) here")


def _run_eval(args: argparse.Namespace) -> None:
    from symeq_dist.evaluate import EvalOptions, evaluate
    from symeq_dist.features import train_classifier

    if str(args.run_dir) == "train-features":
        if args.shards is None:
            raise ConfigError("usage: symeq eval train-features SHARDS_DIR [--features OUT] [--epochs N]")
        info = train_classifier(args.shards, args.features or args.shards / "classifier.pt", epochs=args.epochs,
                                seed=args.seed)
        print(f"wrote {info['path']} ({info['name']}, valid accuracy {info['valid_accuracy']:.4f})")
        return
    results = evaluate(EvalOptions(run_dir=args.run_dir, n=args.n, chain_steps=args.chain_steps, seed=args.seed,
                                   batch_size=args.batch_size, features=args.features,
                                   inception_weights=args.inception_weights, tsne_points=args.tsne_points))
    print((args.run_dir / "eval" / "report.md").read_text())
    print(f"wrote {args.run_dir / 'eval'} (report.md, report.json, figures); step {results['step']}")


def _run_compare(args: argparse.Namespace) -> None:
    from symeq_dist.report import compare_runs

    out_md = args.out.with_suffix(".md") if args.out else None
    out_png = args.out.with_suffix(".png") if args.out else None
    print(compare_runs(args.run_dirs, out_md, out_png))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            run_training(load_config(args.config, args.overrides), argv)
        elif args.command == "sample":
            out = run_sampling(SampleArgs(args.run_dir, args.mode, args.steps, args.num, args.out, args.seed))
            print(f"wrote {out}")
        elif args.command == "shards":
            return run_shards(args)
        elif args.command == "eval":
            _run_eval(args)
        elif args.command == "compare":
            _run_compare(args)
        else:
            from symeq_dist.demo import run_demo
            run_demo()
    except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as err:  # bad input: message names the fix
        print(f"symeq: error: {err}", file=sys.stderr)
        return 2
    except Preempted as err:
        print(f"symeq: {err}", file=sys.stderr)
        return EXIT_REQUEUE
    except (RuntimeError, torch.distributed.DistError) as err:
        if not _collective_failure(err):
            raise
        rank = os.environ.get("RANK", "?")
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        print(f"symeq: error: rank {rank}: a collective operation failed ({first}). Another rank died or hangs "
              f"(fault.collective_timeout_s bounds the wait); see that rank's log. The run stops; resume from "
              f"the last checkpoint with resume=true.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
