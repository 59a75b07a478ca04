"""Images/s of the training stream on RGB JPEG shards at 64², 128² and 256², vs raw tar reads and bare decoding.

Data: for each size S, a temporary shard set of N smooth synthetic photo-like RGB images (a random
low-resolution colour grid upsampled with PIL bicubic, a few gaussian blobs, mild pixel noise), written by
`symeq_dist.datasets.convert.convert` as per-sample JPEG shards (`Schema((3, S, S), "jpg")`, quality 95,
4:4:4), 256 images per shard, 2 writer processes. Removed at the end unless `--keep`.

Contenders per size, one process, interleaved in rounds (`_common.run_rounds`, units = images):

- stream_wW: `build_train_stream(DataConfig(shards=..., num_workers=W, binarize_threshold=None,
  noise="none"), seed=0, rank=0, world_size=1, batch_size=64)` for W = 0 (in-process), 1 and 2
  (DataLoader workers): seeks into the tars, tar member parsing, JPEG decode to uint8 (3, S, S), collation
  to uint8 (64, 3, S, S) batches, and for W >= 1 the transfer of each batch to this process.
- raw: python `tarfile` over the same shards, every member's bytes read once per pass, nothing decoded;
  images = the manifest's sample count per pass.
- decode_only: PIL decode (`np.asarray(Image.open(BytesIO(jpeg)))`) of the same JPEG bytes held in memory,
  one thread: the decode cost alone, to show where the stream's time goes.

Worker streams prefetch (2 batches per worker) while the other contenders run; before each timed segment
those 2 x W batches are taken untimed, so a segment measures batches produced while it runs. Every segment
is preceded by an untimed pause (`--settle`, 0.2 s) so that the other streams' workers have finished
refilling their prefetch buffers and do not compete for the cores.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/image_stream.py          # 2-3 min on 2 cores, 9 rounds
    .venv/bin/python benchmarks/image_stream.py --help

Prints, per size: MB per image on disk, images/s of each contender (median of rounds, and the rounds),
and the ratios stream_wW / raw and stream_wW / decode_only (medians of the per-round ratios). The files are
read from the page cache (they were just written).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from _common import (
    add_threads_arg,
    bench_dir,
    fmt_rounds,
    median,
    ratio,
    raw_tar_pass,
    remove_dir,
    run_rounds,
    set_threads,
)
from PIL import Image

from symeq_dist.config import DataConfig
from symeq_dist.data import build_train_stream
from symeq_dist.data.schema import Sample, Schema
from symeq_dist.datasets.convert import convert
from symeq_dist.runtime.monitor import setup_logging

BATCH = 64
SIZES = (64, 128, 256)
DEFAULT_IMAGES = {64: 2048, 128: 2048, 256: 1024}
DEFAULT_BATCHES = {64: 64, 128: 48, 256: 24}  # ~0.6-0.9 s per in-process stream segment on one core


def make_sample(record: list[int]) -> Sample:
    """Record [S, index] -> a smooth RGB image (3, S, S) from `np.random.default_rng(index)`.

    A 3..6 square grid of random colours upsampled bicubically to S, 2..5 gaussian blobs of random colour
    and width, and gaussian pixel noise of sd 3: compresses like a photo (3.4-5.9 bits per pixel at
    quality 95, 4:4:4), not like noise.
    """
    size, index = record
    rng = np.random.default_rng(index)
    grid = int(rng.integers(3, 7))
    low = Image.fromarray(rng.uniform(0, 255, size=(grid, grid, 3)).astype(np.uint8))
    image = np.asarray(low.resize((size, size), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.uniform(0, 1, 2)
        width = rng.uniform(0.05, 0.25)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
        image += blob[..., None] * rng.uniform(-120, 120, 3)
    image += rng.normal(0, 3, image.shape)
    return Sample(image=np.clip(image, 0, 255).astype(np.uint8).transpose(2, 0, 1).copy())


def write_shards(out: Path, size: int, images: int) -> dict:
    return convert(out, dataset=f"synth{size}", splits={"train": [[size, i] for i in range(images)]},
                   make_sample=make_sample, schema=Schema((3, size, size), "jpg"), samples_per_shard=256,
                   workers=2, meta={})


def shard_paths(shards: Path) -> list[Path]:
    manifest = json.loads((shards / "manifest.json").read_text())
    return [shards / e["name"] for e in manifest["splits"]["train"]["shards"]]


def jpeg_bytes(paths: list[Path]) -> list[bytes]:
    out = []
    for path in paths:
        with tarfile.open(path) as tar:
            out.extend(tar.extractfile(m).read() for m in tar if m.isfile() and m.name.endswith(".jpg"))
    return out


def decode_all(blobs: list[bytes]) -> None:
    for blob in blobs:
        np.asarray(Image.open(io.BytesIO(blob))).transpose(2, 0, 1)


def take(stream: Iterator[dict], batches: int) -> None:
    """Take `batches` batches, dropping each before the next, as a trainer does.

    Keeping them all (`[next(s) for ...]`) put every batch in fresh memory: at 256² the collation's
    `np.stack` then took 18 ms per batch instead of 1 ms (page faults), a quarter of the in-process time.
    """
    for _ in range(batches):
        next(stream)


def per_size(values: list[int] | None, defaults: dict[int, int], sizes: list[int], flag: str) -> dict[int, int]:
    if values is None:
        return {s: defaults.get(s, defaults[max(defaults)]) for s in sizes}
    if len(values) == 1:
        return dict.fromkeys(sizes, values[0])
    if len(values) != len(sizes):
        raise SystemExit(f"{flag}: give one value or one per size ({len(sizes)})")
    return dict(zip(sizes, values, strict=True))


def bench_size(shards: Path, size: int, args: argparse.Namespace, batches: int) -> None:
    paths = shard_paths(shards)
    blobs = jpeg_bytes(paths)
    images = len(blobs)
    disk = sum(p.stat().st_size for p in paths)
    cfg = {w: DataConfig(shards=str(shards), num_workers=w, binarize_threshold=None, noise="none")
           for w in args.workers}
    streams = {f"stream_w{w}": build_train_stream(cfg[w], seed=0, rank=0, world_size=1, batch_size=BATCH)
               for w in args.workers}
    settle = (lambda: time.sleep(args.settle)) if args.settle > 0 else (lambda: None)
    contenders: dict[str, Callable[[int], object]] = {}
    units: dict[str, int] = {}
    before: dict[str, Callable[[], object]] = {}
    for w, (name, stream) in zip(args.workers, streams.items(), strict=True):
        contenders[name] = lambda n, s=stream: take(s, n // BATCH)
        units[name] = batches * BATCH
        before[name] = (lambda s=stream, k=2 * w: (settle(), take(s, k))) if w > 0 else settle
    contenders["raw"] = lambda n: [raw_tar_pass(paths) for _ in range(n // images)]
    units["raw"] = args.passes * images
    before["raw"] = settle
    contenders["decode_only"] = lambda n: [decode_all(blobs) for _ in range(n // images)]
    units["decode_only"] = args.decode_passes * images
    before["decode_only"] = settle
    start = time.perf_counter()
    times = run_rounds(contenders, rounds=args.rounds, units=units, before=before)  # seconds per image
    elapsed = time.perf_counter() - start
    for stream in streams.values():
        stream.close()
    print(f"\n{size}x{size} RGB JPEG q95: {images} images in {len(paths)} shards, {disk / 1e6:.1f} MB on disk, "
          f"{disk / images / 1e6:.4f} MB/image ({sum(map(len, blobs)) / images / 1e3:.1f} kB JPEG), "
          f"{args.rounds} rounds in {elapsed:.0f} s; per segment: stream {batches} batches of {BATCH}, "
          f"raw {args.passes} passes, decode_only {args.decode_passes} passes")
    for name, values in times.items():
        rates = [1 / v for v in values]
        print(f"  {name:12s} {median(rates):9,.0f} images/s   (rounds: {fmt_rounds(rates, 1, 0)})")
    for name in streams:
        for den in ("raw", "decode_only"):
            mid, low, high = ratio(times, den, name)  # seconds per image: den/stream = stream rate / den rate
            print(f"  ratio {name} / {den:11s} (images/s): median {mid:.3f}  (per round {low:.3f} .. {high:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="image sizes S (S x S RGB)")
    parser.add_argument("--images", type=int, nargs="+", default=None,
                        help="train images per size: one value, or one per size (default 2048, 2048, 1024)")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="stream batches of 64 per segment: one value, or one per size (default 64, 48, 24)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="num_workers values")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--passes", type=int, default=8, help="raw passes over the shards per segment")
    parser.add_argument("--decode-passes", type=int, default=2, help="decode_only passes over the images per segment")
    parser.add_argument("--settle", type=float, default=0.2,
                        help="untimed seconds before each segment, for prefetching workers to go idle")
    parser.add_argument("--keep", action="store_true", help="keep the temporary shard directory (its path is printed)")
    add_threads_arg(parser)
    args = parser.parse_args()
    images = per_size(args.images, DEFAULT_IMAGES, args.sizes, "--images")
    batches = per_size(args.batches, DEFAULT_BATCHES, args.sizes, "--batches")
    set_threads(args.threads)
    setup_logging(1)  # warnings only
    logging.getLogger("symeq_dist.datasets.convert").setLevel(logging.WARNING)
    tmp = bench_dir("symeq-bench-image-stream-")
    try:
        start = time.perf_counter()
        for size in args.sizes:
            write_shards(tmp / f"s{size}", size, images[size])
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"wrote {', '.join(f'{images[s]} x {s}²' for s in args.sizes)} in {time.perf_counter() - start:.0f} s "
              f"to {tmp}; torch threads {torch.get_num_threads()} (workers: 1 each), cores {os.cpu_count()} "
              f"(usable {affinity}), load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for size in args.sizes:
            bench_size(tmp / f"s{size}", size, args, batches[size])
        print(f"\nload average at the end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            remove_dir(tmp)


if __name__ == "__main__":
    main()
