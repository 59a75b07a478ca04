"""Images/s of the training stream vs reading the same tar files raw, and vs what the trainer consumes.

Contenders, one process, interleaved in rounds:

- stream_wW: `build_train_stream(DataConfig(shards=..., num_workers=W), seed=0, rank=0, world_size=1,
  batch_size=128)` for W = 0 (in-process), 1 and 2 (DataLoader workers): tar reading, packed-block
  splitting, the 1,000-sample shuffle buffer, collation to uint8 (128, 1, 28, 28) batches.
- raw: python `tarfile` over the same train shards, every member's bytes read, nothing decoded. The MNIST
  shards are packed (256 digits per `images.npy` member, manifest "format": "packed"), so raw images/s =
  the manifest's sample count of the shards read per second.
- trainer: the real Trainer on the demo config as shipped (its own in-process stream, the game, the
  persistent chain), for context: the images/s the stream has to sustain (`--no-trainer` skips it).

Worker streams prefetch (2 batches per worker) while the other contenders run; before each timed segment
those 2 x W batches are taken untimed, so a segment measures batches produced while it runs.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/stream_throughput.py      # ~2 min
    .venv/bin/python benchmarks/stream_throughput.py --help

Prints images/s of each (median of rounds) and the ratios stream / raw and trainer / stream (medians of
the per-round ratios). The files are read from the page cache after the first round.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from _common import (
    DEMO_CONFIG,
    SHARDS,
    add_threads_arg,
    bench_dir,
    bench_overrides,
    ensure_shards,
    fmt_rounds,
    median,
    ratio,
    raw_tar_pass,
    remove_dir,
    run_rounds,
    set_threads,
)

from symeq_dist.api import build_trainer
from symeq_dist.config import DataConfig, load_config
from symeq_dist.data import build_train_stream
from symeq_dist.runtime import dist
from symeq_dist.runtime.monitor import setup_logging

BATCH = 128


def raw_reader(shards: Path, split: str) -> tuple[Callable[[], int], int]:
    """A function reading every member of every shard of `split` once, and the images that covers."""
    manifest = json.loads((shards / "manifest.json").read_text())
    entries = manifest["splits"][split]["shards"]
    paths = [shards / e["name"] for e in entries]
    images = sum(int(e["num_samples"]) for e in entries)

    return lambda: raw_tar_pass(paths), images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=SHARDS)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="num_workers values")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40, help="stream batches of 128 per round and contender")
    parser.add_argument("--passes", type=int, default=2, help="raw passes over the train shards per round")
    parser.add_argument("--trainer-steps", type=int, default=20, help="trainer steps per round")
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="config of the trainer contender")
    parser.add_argument("--no-trainer", action="store_true", help="skip the trainer contender")
    add_threads_arg(parser)
    args = parser.parse_args()
    ensure_shards(args.shards)
    set_threads(args.threads)
    setup_logging(1)  # warnings only
    streams = {f"stream_w{w}": build_train_stream(DataConfig(shards=str(args.shards), num_workers=w), seed=0,
                                                  rank=0, world_size=1, batch_size=BATCH)
               for w in args.workers}
    one_pass, pass_images = raw_reader(args.shards, "train")
    contenders, units, before = {}, {}, {}
    for (name, stream), w in zip(streams.items(), args.workers, strict=True):
        contenders[name] = lambda n, s=stream: [next(s) for _ in range(n // BATCH)]
        units[name] = args.batches * BATCH
        if w > 0:
            before[name] = lambda s=stream, k=2 * w: [next(s) for _ in range(k)]
    contenders["raw"] = lambda n: [one_pass() for _ in range(n // pass_images)]
    units["raw"] = args.passes * pass_images
    trainer = None
    if not args.no_trainer:
        info = dist.init()
        tmp = bench_dir("symeq-bench-stream-")
        total = args.trainer_steps * (args.rounds + 1)
        trainer = build_trainer(load_config(args.config, [f"run_dir={tmp / 'trainer'}",
                                                          *bench_overrides(args.shards, total)]), info)
        contenders["trainer"] = lambda n: trainer.train(until=trainer.state.step + n // BATCH)
        units["trainer"] = args.trainer_steps * BATCH
    times = run_rounds(contenders, rounds=args.rounds, units=units, before=before)  # seconds per image
    for stream in streams.values():
        stream.close()
    bytes_per_pass = one_pass()
    print(f"train split: {pass_images} images in {bytes_per_pass / 1e6:.2f} MB of tar "
          f"({bytes_per_pass / pass_images:.0f} B/image read raw), batch {BATCH}, {args.rounds} rounds, "
          f"torch threads {torch.get_num_threads()} (workers: 1 each)")
    for name, values in times.items():
        rates = [1 / v for v in values]
        print(f"  {name:10s} {median(rates):10,.0f} images/s   (rounds, k images/s: {fmt_rounds(rates, 1e-3)})")
    for name in streams:
        mid, low, high = ratio(times, "raw", name)  # seconds per image: raw/stream = stream rate / raw rate
        print(f"ratio {name} / raw (images/s): median {mid:.4f}  (per round {low:.4f} .. {high:.4f})")
    if trainer is not None:
        cfg = trainer.cfg
        print(f"trainer: {args.config.name} as shipped (model {cfg.model.kind}, data.num_workers "
              f"{cfg.data.num_workers}, chain_every {cfg.sampling.chain_every}), "
              f"{median(times['trainer']) * BATCH * 1e3:.1f} ms/step")
        for name in streams:
            mid, low, high = ratio(times, name, "trainer")  # = trainer rate / stream rate
            print(f"ratio trainer / {name} (images/s): median {mid:.4f}  (per round {low:.4f} .. {high:.4f}): "
                  f"the trainer uses {mid:.1%} of what it delivers")
        trainer.close()
        remove_dir(tmp)
        dist.shutdown()


if __name__ == "__main__":
    main()
