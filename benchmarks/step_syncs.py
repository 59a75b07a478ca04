"""Host syncs per training step: how often the trainer (and DeepSpeed, and torch) read a tensor's value into
Python (`.item()`, `.tolist()`, `bool()`, `float()`, `int()`), each a host-device synchronisation on a GPU.

Runs the real Trainer (ZeRO-0 by default) for `--steps` steps after a warm-up, with one logging step at the end
(monitor.log_every = --steps), counting the calls per caller (`symeq_dist.runtime.syncs.SyncCounter`).

    .venv/bin/python benchmarks/step_syncs.py                       # demo MLP, 1 process, ~20 s
    .venv/bin/python benchmarks/step_syncs.py --world 2             # two processes (torchrun, gloo)
    .venv/bin/python benchmarks/step_syncs.py --overrides game.grad_spike=50

On this CPU-only machine every counted call is one that would synchronise on a GPU if its tensor lived there;
torch.optim's Adam reads its step counters, which stay on the CPU even in GPU runs (no sync there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import DEMO_CONFIG, SHARDS, bench_dir, bench_overrides, ensure_shards, launch, remove_dir

from symeq_dist.api import build_trainer
from symeq_dist.config import load_config
from symeq_dist.runtime import dist
from symeq_dist.runtime.monitor import setup_logging
from symeq_dist.runtime.syncs import SyncCounter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG)
    parser.add_argument("--shards", type=Path, default=SHARDS)
    parser.add_argument("--steps", type=int, default=50, help="counted steps (the last one logs)")
    parser.add_argument("--world", type=int, default=1, help="processes (torchrun on loopback when > 1)")
    parser.add_argument("--overrides", nargs="*", default=[], help="dotted config overrides")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ensure_shards(args.shards)
    if args.world > 1 and not args.child:
        launch(Path(__file__), [*sys.argv[1:], "--child"], world=args.world)
        return
    info = dist.init()
    setup_logging(1)  # warnings only
    tmp = bench_dir("symeq-bench-syncs-")
    warmup = 10
    overrides = [f"run_dir={tmp / 'run'}", *bench_overrides(args.shards, warmup + args.steps),
                 f"monitor.log_every={args.steps}", "engines.encoder.zero_stage=0", "engines.decoder.zero_stage=0",
                 *args.overrides]
    trainer = build_trainer(load_config(args.config, overrides), info)
    trainer.train(until=warmup)
    with SyncCounter() as syncs:
        trainer.train(until=warmup + args.steps)
    trainer.close()
    remove_dir(tmp)
    if info.is_main:
        print(f"config {args.config.name} {' '.join(args.overrides)}".rstrip())
        print(f"world size {info.world_size}: host syncs over {args.steps} steps (one of them a logging step)")
        for prefix in ("symeq_dist/", "deepspeed/", "torch/"):
            print(f"  {prefix:12s} {syncs.total(prefix):6d}  ({syncs.total(prefix) / args.steps:.2f} per step)")
        print("by caller:")
        for where, count in syncs.by_caller().items():
            print(f"  {count:6d}  {where}")
    dist.shutdown()


if __name__ == "__main__":
    main()
