"""`symeq prior ...`: separately trained priors over latent codes (METHOD §7.5). Parsing and printing only.

    symeq prior codes runs/A --out data_shards/A-codes              # A's aggregate-posterior codes, train + valid
    symeq prior train configs/prior_diffusion.yaml data.shards=data_shards/A-codes run_dir=runs/A-prior
    accelerate launch --multi_gpu --num_processes 2 -m symeq_dist.cli prior train CONFIG ...   # or torchrun
    symeq prior sample runs/A-prior --n 10000 --out data_shards/A-prior-samples
    symeq prior eval runs/A-prior --codes data_shards/A-codes
    symeq train CONFIG prior.kind=model prior.run=runs/A-prior     # the game with pi := the prior's samples
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_prior_parser(sub: argparse._SubParsersAction) -> None:
    prior = sub.add_parser("prior", help="train, sample and evaluate a separate prior over latent codes",
                           description="Implicit priors (METHOD §7.5): a model trained with accelerate on a run's "
                                       "latent codes, whose samples feed the game as prior.kind=model or shards.")
    cmds = prior.add_subparsers(dest="prior_command", required=True)
    train = cmds.add_parser("train", help="train or resume a prior run (accelerate: 1 or many processes)")
    train.add_argument("config", type=Path, help="prior config YAML (configs/prior_*.yaml)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.shards=DIR train.steps=2000")
    resume = cmds.add_parser("resume", help="continue a prior run from its directory")
    resume.add_argument("run_dir", type=Path)
    resume.add_argument("overrides", nargs="*", help="e.g. train.steps=4000")
    codes = cmds.add_parser("codes", help="write a trained run's top-latent codes z ~ q(z|x) as latent shards",
                            description="Draw z_top ~ q(z_top | x) once per image of each split (clean images, shard "
                                        "order, one seeded generator) and write them as a latent shard set. "
                                        "Rerunning after an interruption resumes.")
    codes.add_argument("run_dir", type=Path, help="a `symeq train` run (its latest checkpoint)")
    codes.add_argument("--out", type=Path, required=True, help="the latent shard set to write")
    codes.add_argument("--split", default=None, help="comma-separated splits (default: the run's data.split and "
                       "data.eval_split, e.g. train,valid)")
    _seed_and_weights(codes)
    codes.add_argument("--samples-per-shard", type=int, default=10000, help="codes per tar (default 10000)")
    sample = cmds.add_parser("sample", help="write a prior run's samples as latent shards (prior.kind=shards)")
    sample.add_argument("run_dir", type=Path, help="a `symeq prior train` run")
    sample.add_argument("--n", type=int, default=10000, dest="num")
    sample.add_argument("--out", type=Path, required=True)
    sample.add_argument("--split", default="train", help="the split name the samples are written as")
    _seed_and_weights(sample)
    sample.add_argument("--samples-per-shard", type=int, default=10000, help="codes per tar (default 10000)")
    evaluate = cmds.add_parser("eval", help="how close a prior's samples are to held-out codes",
                               description="Fréchet distance in code space and per-dimension moments of the "
                                           "prior's samples against held-out codes, beside the closed-form prior "
                                           "(N(0, I) or uniform bits) as the reference a learned prior must beat.")
    evaluate.add_argument("run_dir", type=Path, help="a `symeq prior train` run")
    evaluate.add_argument("--codes", type=Path, default=None, help="latent shard set (default: the run's data.shards)")
    evaluate.add_argument("--split", default=None, help="held-out split (default: the run's data.eval_split)")
    evaluate.add_argument("--n", type=int, default=5000, dest="num", help="samples and held-out codes compared")
    _seed_and_weights(evaluate)
    evaluate.add_argument("--sample-steps", type=int, default=0,
                          help="diffusion priors: DDIM steps per draw (default: the run's model.sample_steps)")
    evaluate.add_argument("--json", type=Path, default=None, help="also write the report here")


def _seed_and_weights(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trained-weights", action="store_true", help="the trained weights, not the averages")


def run_prior(args: argparse.Namespace, argv: list[str]) -> None:
    from symeq_dist import api

    if args.prior_command in ("train", "resume"):
        from symeq_dist.priors.trainer import load_prior_config

        if args.prior_command == "resume":
            args.config, args.overrides = None, [f"run_dir={args.run_dir}", "resume=true", *args.overrides]
        last = api.train_prior(load_prior_config(args.config, args.overrides), argv[1:])
        if last:
            print("prior: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
    elif args.prior_command == "codes":
        splits = None if args.split is None else [s for s in args.split.split(",") if s]
        manifest = api.prior_codes(args.run_dir, args.out, splits=splits, seed=args.seed,
                                   ema=not args.trained_weights, samples_per_shard=args.samples_per_shard)
        _print_set(args.out, manifest)
    elif args.prior_command == "sample":
        manifest = api.prior_sample(args.run_dir, args.out, num=args.num, split=args.split, seed=args.seed,
                                    ema=not args.trained_weights, samples_per_shard=args.samples_per_shard)
        _print_set(args.out, manifest)
    else:
        from symeq_dist.eval.prior import evaluate, format_report

        report = evaluate(args.run_dir, codes=args.codes, split=args.split, num=args.num, seed=args.seed,
                          ema=not args.trained_weights, sample_steps=args.sample_steps)
        print(format_report(report))
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=1))


def _print_set(out: Path, manifest: dict) -> None:
    code = manifest["code"]
    splits = ", ".join(f"{s} {e['num_samples']}" for s, e in manifest["splits"].items())
    print(f"wrote {out}: {code['family']} codes of shape {tuple(code['shape'])} ({splits})")
