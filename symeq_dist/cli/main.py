"""The `symeq` command: argument parsing, dispatch to `symeq_dist.api`, and exit codes. No training logic here.

    symeq train configs/mnist_ladder.yaml train.steps=200 engines.decoder.lr=2e-4
    symeq resume runs/mnist_ladder train.steps=400
    symeq sample runs/demo --mode limiting --steps 1000 --n 64 --out grid.png
    symeq shards mnist --out data_shards/mnist ; symeq shards verify data_shards/mnist
    symeq demo
    symeq eval train-features data_shards/mnist ; symeq eval runs/demo --n 10000 --chain-steps 1000
    symeq compare runs/symmetric runs/elbo
    symeq prior codes runs/demo --out data_shards/demo-codes ; symeq prior train configs/prior_diffusion.yaml ...

Sub-commands import what they need when they run, so `symeq --help` and `symeq shards ...` stay light.
Exit codes: 0 done, 2 bad input (the project's `InputError`: one line naming the fix; any other exception
is a bug and keeps its traceback), 75 preempted after a checkpoint, 1 a failed collective.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from symeq_dist.cli.eval import add_eval_parsers, run_compare, run_eval
from symeq_dist.cli.prior import add_prior_parser, run_prior
from symeq_dist.errors import InputError

EXIT_INPUT, EXIT_COLLECTIVE = 2, 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="symeq", description="Symmetric Equilibrium Learning of VAEs "
                                     "with one DeepSpeed engine per player.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train or resume a run",
                           description="Train a run. Launch several processes with `symeq-launch "
                                       "--nproc-per-node N CONFIG ...` (or torchrun -m symeq_dist.cli).")
    train.add_argument("config", type=Path, help="run config YAML (configs/*.yaml)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 "
                       "engines.decoder.lr=2e-4 resume=true")
    resume = sub.add_parser("resume", help="continue a run from its directory, wherever it is",
                            description="Continue RUN_DIR from its latest checkpoint with its stored config; "
                                        "overrides may change train.steps, monitor.*, checkpoint.* and fault.*.")
    resume.add_argument("run_dir", type=Path, help="a run directory (holds config.yaml and checkpoints/)")
    resume.add_argument("overrides", nargs="*", help="e.g. train.steps=40000")
    sample = sub.add_parser("sample", help="sample grids from a trained run")
    sample.add_argument("run_dir", type=Path)
    sample.add_argument("--mode", choices=["random", "limiting"], default="random",
                        help="random code (z ~ prior, decode) or the limiting chain x -> z -> x")
    sample.add_argument("--steps", type=int, default=1000, help="limiting-chain steps (default 1000)")
    sample.add_argument("--n", type=int, default=64, dest="num", help="number of samples")
    sample.add_argument("--out", type=Path, default=Path("grid.png"),
                        help="the grid's PNG file, the PNG folder (png-dir) or the .npz file to write")
    sample.add_argument("--format", choices=["grid", "png-dir", "npz"], default="grid",
                        help="grid: one PNG to look at; png-dir: one 8-bit PNG per sample (pytorch-fid, clean-fid, "
                             "torch-fidelity); npz: arr_0 uint8 (N, H, W, C)")
    sample.add_argument("--batch-size", type=int, default=500, help="samples generated at once")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--prior", type=Path, default=None,
                        help="random codes from this prior instead of the run's own: a `symeq prior train` run or a "
                             "latent shard set (the two-stage VAE)")
    # listed here for --help only: `main` hands `symeq shards ...` to cli/shards.py, so only it loads the converters
    sub.add_parser("shards", help="convert a data set to webdataset shards, or verify shards (symeq shards --help)")
    demo = sub.add_parser("demo", help="the main job: MNIST shards, a short symmetric run, sample grids",
                          description="Write the MNIST-5k shards if missing, train the demo config, sample grids.")
    demo.add_argument("--config", type=Path, default=Path("configs/demo_mnist_mlp.yaml"))
    demo.add_argument("--chain-steps", type=int, default=1000, help="limiting-chain steps of the final grid")
    demo.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=500")
    add_eval_parsers(sub)
    add_prior_parser(sub)
    return parser


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "shards":
        from symeq_dist.cli.shards import run_shards
        return run_shards(args)
    if args.command == "eval":
        run_eval(args)
    elif args.command == "compare":
        run_compare(args)
    elif args.command == "prior":
        run_prior(args, argv)
    elif args.command in ("train", "resume"):
        from symeq_dist import api
        if args.command == "resume":
            args.config, args.overrides = None, [f"run_dir={args.run_dir}", "resume=true", *args.overrides]
        api.train(api.load_run_config(args.config, args.overrides), argv)
    elif args.command == "sample":
        from symeq_dist import api
        req = api.SampleRequest(run_dir=args.run_dir, mode=args.mode, steps=args.steps, num=args.num,
                                out=args.out, seed=args.seed, format=args.format, batch_size=args.batch_size,
                                prior=args.prior)
        result = api.sample(req)
        what = "random-code" if args.mode == "random" else f"limiting-chain ({args.steps} steps)"
        print(f"wrote {result.path}: {result.num} {what} samples ({args.format}) from {args.run_dir} at "
              f"training step {result.step}")
    else:
        from symeq_dist.demo import run_demo
        run_demo(args.config, args.overrides, args.chain_steps)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["shards"]:
        from symeq_dist.cli.shards import shards_parser
        args = shards_parser().parse_args(argv[1:])
        args.command = "shards"
    else:
        args = _parser().parse_args(argv)
    try:
        return _dispatch(args, argv)
    except InputError as err:  # bad input: the message names the fix; anything else keeps its traceback
        print(f"symeq: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as err:
        code = _known_failure(err)
        if code is None:
            raise
        return code


def _known_failure(err: BaseException) -> int | None:
    """Exit code and one-line message for a preemption or a failed collective; None for anything else."""
    from symeq_dist.train.preemption import EXIT_REQUEUE, Preempted

    if isinstance(err, Preempted):
        print(f"symeq: {err}", file=sys.stderr)
        return EXIT_REQUEUE
    if not _collective_failure(err):
        return None
    rank = os.environ.get("RANK", "?")
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    print(f"symeq: error: rank {rank}: a collective operation failed ({first}). Another rank died or hangs "
          f"(fault.collective_timeout_s bounds the wait); see that rank's log. The run stops; resume from "
          f"the last checkpoint with resume=true.", file=sys.stderr)
    return EXIT_COLLECTIVE


def _collective_failure(err: BaseException) -> bool:
    """A failed or timed-out collective (a peer died or hangs), as gloo and NCCL report it."""
    import torch

    if isinstance(err, torch.distributed.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(m in text for m in ("gloo", "Gloo", "NCCL", "Connection closed",
                                                                     "Connection reset", "timed out"))
