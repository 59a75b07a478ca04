"""Step-time overhead of the symeq-dist trainer against a minimal hand-written PyTorch loop.

Both run the same game (alternating: wake sample, decoder Adam step, dream from the updated decoder,
encoder Adam step) on the same model with the same global batch, in one process, interleaved in rounds
so that machine drift hits both alike. Ours is the real Trainer (ZeRO-0, world size 1, its data stream
from real shards, noise, finiteness agreement, MI monitors, logging) with the persistent monitoring chain
either on (the default, one chain step per iteration) or off (`sampling.chain_every=0`). The plain loop
reads batches from an in-memory tensor and does nothing but the game.

    .venv/bin/python benchmarks/step_overhead.py [--config configs/demo_mnist_mlp.yaml] [--rounds 5]

Prints the median milliseconds per step of each and the ratios ours / plain (median of the per-round
ratios, so that a slow spell of a shared machine hits both sides of a ratio alike).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from _common import PlainGame  # noqa: E402

from symeq_dist.api import build_trainer  # noqa: E402
from symeq_dist.config import load_config  # noqa: E402
from symeq_dist.data import build_eval_batches, load_manifest  # noqa: E402
from symeq_dist.datasets.mnist import write_mnist_shards  # noqa: E402
from symeq_dist.runtime import dist  # noqa: E402
from symeq_dist.runtime.monitor import setup_logging  # noqa: E402


def time_steps(fn, steps: int) -> float:
    start = time.perf_counter()
    fn(steps)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo_mnist_mlp.yaml")
    parser.add_argument("--shards", type=Path, default=ROOT / "data_shards" / "mnist")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=60, help="steps per round and contender")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra config overrides for our trainer")
    args = parser.parse_args()
    try:
        load_manifest(args.shards)
    except FileNotFoundError:
        write_mnist_shards(args.shards)
    info = dist.init()
    setup_logging(1)  # warnings only
    torch.set_num_threads(torch.get_num_threads())
    total = args.steps * (args.rounds + 1) + 1  # +1: the final-step checkpoint and grids stay out of the timing
    tmp = Path(tempfile.mkdtemp(prefix="symeq-bench-"))
    common = [f"data.shards={args.shards}", f"train.steps={total}", "monitor.progress=false",
              "monitor.image_every=1000000", "checkpoint.every=1000000", "monitor.log_every=100",
              "engines.encoder.zero_stage=0", "engines.decoder.zero_stage=0", *args.overrides]
    trainers = {name: build_trainer(load_config(args.config, [f"run_dir={tmp / name}", *common, *extra]), info)
                for name, extra in (("ours", []), ("ours_no_chain", ["sampling.chain_every=0"]))}
    cfg = trainers["ours"].cfg
    images = torch.cat([b["image"] for b in build_eval_batches(cfg.data, split=cfg.data.split, batch_size=512)])
    plain = PlainGame(cfg, images)
    contenders = {"plain": lambda n: [plain.step() for _ in range(n)]}
    for name, trainer in trainers.items():
        contenders[name] = lambda n, t=trainer: t.train(until=t.state.step + n)
    for fn in contenders.values():  # warm-up round (allocations, worker start-up)
        fn(args.steps)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            times[name].append(time_steps(fn, args.steps))
    for trainer in trainers.values():
        trainer.close()
    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"model {cfg.model.kind} ({cfg.model.latent} latent), batch {cfg.train.batch_size}, "
          f"{args.rounds} rounds x {args.steps} steps, torch threads {torch.get_num_threads()}")
    for name, value in med.items():
        print(f"  {name:14s} {value * 1e3:8.2f} ms/step   (rounds: "
              f"{', '.join(f'{v * 1e3:.1f}' for v in times[name])})")
    for name, label in (("ours_no_chain", "chain_every=0 (the game)"), ("ours", "with persistent chain")):
        # per-round ratios: a slow spell of the machine hits both contenders of a round alike
        ratios = sorted(o / p for o, p in zip(times[name], times["plain"], strict=True))
        print(f"ratio ours/plain, {label:25s} median {statistics.median(ratios):.3f}  "
              f"(per round {ratios[0]:.3f} .. {ratios[-1]:.3f}; ratio of medians {med[name] / med['plain']:.3f})")
    dist.shutdown()


if __name__ == "__main__":
    main()
