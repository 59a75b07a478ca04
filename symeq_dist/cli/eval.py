"""`symeq eval` and `symeq compare`: argument parsing and printing only (the work is `symeq_dist.eval`)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def add_eval_parsers(sub: Any) -> None:
    ev = sub.add_parser("eval", help="evaluate a run (FD/FID, consistency, MI, probe, t-SNE) -> <run_dir>/eval/",
                        description="symeq eval RUN_DIR [options]   |   symeq eval train-features SHARDS_DIR")
    ev.add_argument("run_dir", type=Path, help="a run directory, or the word train-features")
    ev.add_argument("shards", type=Path, nargs="?",
                    help="with train-features: the shards to train the feature network on")
    ev.add_argument("--n", type=int, default=10_000, help="samples per generated set (default 10000)")
    ev.add_argument("--chain-steps", default="1000", metavar="N[,N...]",
                    help="limiting-chain steps (default 1000); a list such as 0,10,100,1000 measures the chain after "
                         "each length in one pass (report keys limiting_chain@N)")
    ev.add_argument("--step", type=int, default=None,
                    help="evaluate the checkpoint of this training step (default: the latest); reports go to "
                         "RUN_DIR/eval/step_<N>/ and are copied to RUN_DIR/eval/")
    ev.add_argument("--iw-samples", type=int, default=1, metavar="K",
                    help="bits/dim on the held-out split: 1 (default) = negative ELBO; K > 1 also the importance-"
                         "weighted bound with K encoder draws per image")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--trained-weights", action="store_true",
                    help="evaluate the trained weights, not the run's averages (train.ema_decay), which early in a run "
                         "still carry much of the initial weights")
    ev.add_argument("--batch-size", type=int, default=500, help="images generated and embedded at once")
    ev.add_argument("--features", type=Path, default=None,
                    help="feature-network checkpoint (default <shards>/classifier.pt, trained there on first use); "
                         "train-features: where to write it")
    ev.add_argument("--no-train-features", action="store_true",
                    help="stop with an error instead of training the missing default feature network")
    ev.add_argument("--inception-weights", type=Path, default=None,
                    help="local pt_inception-2015-12-05-6726825d.pth for FID (never downloaded)")
    ev.add_argument("--tsne-points", type=int, default=2000, help="codes per set in the t-SNE figure")
    ev.add_argument("--epochs", type=int, default=5,
                    help="feature-network epochs (train-features, or its training on first use; default 5)")
    ev.add_argument("--threads", type=int, default=1,
                    help="feature-network training: torch threads (default 1: the file's bytes do not depend on the "
                         "core count, and one is faster on a busy CPU; 0: torch's default, the machine's cores)")
    ev.add_argument("--prior", type=Path, default=None,
                    help="evaluate with this prior in place of the run's own: a `symeq prior train` run or a latent "
                         "shard set (the two-stage VAE); written to eval/step_N-prior-NAME/")
    cmp = sub.add_parser("compare", help="put evaluated runs side by side (markdown table + plot)")
    cmp.add_argument("run_dirs", type=Path, nargs="+")
    cmp.add_argument("--out", type=Path, default=None,
                     help="also write the table (OUT.md) and a plot (OUT.png) here; runs evaluated at several steps "
                          "add FD and gap against the training step (OUT_curves.png and a table in OUT.md)")


def run_eval(args: argparse.Namespace) -> None:
    from symeq_dist import api
    from symeq_dist.config import ConfigError
    from symeq_dist.eval.diagnostics import parse_chain_lengths
    from symeq_dist.eval.features.classifier import train_classifier
    from symeq_dist.eval.run import EvalOptions

    if str(args.run_dir) == "train-features":
        if args.shards is None:
            raise ConfigError("usage: symeq eval train-features SHARDS_DIR [--features OUT] [--epochs N] "
                              "[--threads N]")
        info = train_classifier(args.shards, args.features or args.shards / "classifier.pt", epochs=args.epochs,
                                seed=args.seed, num_threads=args.threads or None)
        print(f"wrote {info['path']} ({info['name']}, trained on {info['target_description']}; "
              f"{info['accuracy_split']} accuracy {info['valid_accuracy']:.4f})")
        return
    lengths = parse_chain_lengths(args.chain_steps)
    opts = EvalOptions(run_dir=args.run_dir, n=args.n, chain_steps=lengths if len(lengths) > 1 else lengths[0],
                       step=args.step, seed=args.seed, ema=not args.trained_weights, iw_samples=args.iw_samples,
                       batch_size=args.batch_size, features=args.features, train_features=not args.no_train_features,
                       feature_epochs=args.epochs, feature_threads=args.threads or None,
                       inception_weights=args.inception_weights, tsne_points=args.tsne_points, prior=args.prior)
    with _eval_log():  # says when the feature network is trained first
        results = api.evaluate(opts)
    step_dir = args.run_dir / "eval" / (f"step_{results['step']:08d}" + (f"-prior-{args.prior.name}" if args.prior
                                                                        else ""))
    print((step_dir / "report.md").read_text())
    print(f"wrote {step_dir} (report.md, report.json, figures; copied to {args.run_dir / 'eval'}); "
          f"step {results['step']}")


@contextlib.contextmanager
def _eval_log() -> Iterator[None]:
    """Show the evaluation's INFO messages on stderr, message only, while it runs."""
    logger, handler = logging.getLogger("symeq_dist.eval"), logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("symeq: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_compare(args: argparse.Namespace) -> None:
    from symeq_dist.eval.compare import compare_runs

    out_md = args.out.with_suffix(".md") if args.out else None
    out_png = args.out.with_suffix(".png") if args.out else None
    out_curves = args.out.with_name(args.out.with_suffix("").name + "_curves.png") if args.out else None
    print(compare_runs(args.run_dirs, out_md, out_png, out_curves=out_curves))
