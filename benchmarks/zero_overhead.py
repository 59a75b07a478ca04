"""Our trainer vs a minimal hand-written PyTorch loop of the same game, at ZeRO stages 0-3, world size 1 and 2.

Ours is the real Trainer (`symeq_dist.api.build_trainer`: two DeepSpeed engines, the shard stream, noise,
finiteness agreement, MI monitors, logging) with both players at one ZeRO stage
(`engines.encoder.zero_stage=S engines.decoder.zero_stage=S`). Plain is `_common.PlainGame`: two modules,
two torch.optim.Adam, batches from memory; at world size 2 it all-reduces each player's gradients by hand
(one flattened tensor per player, averaged) before its Adam step. The global batch is the config's
(128 in the demo: micro 64 per rank at world size 2). All five contenders (plain, ours at ZeRO-0/1/2/3)
live in one process per rank and are interleaved in rounds; a segment's time is the slowest rank's.

The persistent monitoring chain is off (`sampling.chain_every=0`): this compares the game alone (the
chain is measured in step_overhead.py).

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/zero_overhead.py              # world 1 and 2, ~5 min
    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/zero_overhead.py --worlds 2 --rounds 6 --steps 30
    .venv/bin/python benchmarks/zero_overhead.py --help

The script re-launches itself once per world size: plainly for 1, under
`python -m torch.distributed.run --standalone --nproc_per_node 2` (= torchrun; OMP_NUM_THREADS=1 per
rank) for 2. It can also be started under torchrun directly (then it measures that world size only).
Only rank 0 prints. Prints per world size the ms/step of each contender (median of rounds) and the ratio
ours / plain (median of the per-round ratios), then one summary table.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from _common import (
    DEMO_CONFIG,
    SHARDS,
    PlainGame,
    add_threads_arg,
    bench_dir,
    bench_overrides,
    ensure_shards,
    fmt_rounds,
    launch,
    median,
    ratio,
    remove_dir,
    run_rounds,
    set_threads,
)

from symeq_dist.api import build_trainer
from symeq_dist.config import load_config
from symeq_dist.data import build_eval_batches
from symeq_dist.runtime import dist
from symeq_dist.runtime.monitor import setup_logging

STAGES = (0, 1, 2, 3)


def measure(args: argparse.Namespace) -> list[dict[str, float]]:
    """This process's part of one world size (collective); returns rows on every rank."""
    info = dist.init()
    setup_logging(1)  # warnings only
    tmp = bench_dir("symeq-bench-zero-")  # one run_dir per contender, shared by the ranks
    common = [*bench_overrides(args.shards, args.steps * (args.rounds + 1)), "sampling.chain_every=0",
              *args.overrides]
    trainers = {}
    for stage in STAGES:
        cfg = load_config(args.config, [f"run_dir={tmp / f'zero{stage}'}", *common,
                                        f"engines.encoder.zero_stage={stage}", f"engines.decoder.zero_stage={stage}"])
        trainers[f"ours_zero{stage}"] = build_trainer(cfg, info)
    cfg = trainers["ours_zero0"].cfg
    images = torch.cat([b["image"] for b in build_eval_batches(cfg.data, split=cfg.data.split, batch_size=512)])
    plain = PlainGame(cfg, images, rank=info.rank, world_size=info.world_size)
    contenders = {"plain": lambda n: [plain.step() for _ in range(n)]}
    for name, trainer in trainers.items():
        contenders[name] = lambda n, t=trainer: t.train(until=t.state.step + n)
    times = run_rounds(contenders, rounds=args.rounds, units=args.steps)
    for trainer in trainers.values():
        trainer.close()
    remove_dir(tmp)
    rows = []
    if info.is_main:
        params = sum(p.numel() for p in plain.encoder.parameters()) + sum(p.numel() for p in plain.decoder.parameters())
        print(f"world {info.world_size}: model {cfg.model.kind} ({params / 1e6:.2f}M parameters), global batch "
              f"{cfg.train.batch_size} (micro {cfg.micro_batch_size(info.world_size)} per rank), torch threads "
              f"{torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps", flush=True)
        for name, values in times.items():
            print(f"  {name:11s} {median(values) * 1e3:8.2f} ms/step   (rounds: {fmt_rounds(values)})", flush=True)
        for stage in STAGES:
            mid, low, high = ratio(times, f"ours_zero{stage}", "plain")
            rows.append({"world": info.world_size, "stage": stage, "ours_ms": median(times[f"ours_zero{stage}"]) * 1e3,
                         "plain_ms": median(times["plain"]) * 1e3, "ratio": mid, "low": low, "high": high})
    return rows


def print_table(rows: list[dict[str, float]]) -> None:
    print("\n| world | ZeRO stage | ms/step ours | ms/step plain | ratio ours/plain (median of rounds; range) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world']} | {r['stage']} | {r['ours_ms']:.1f} | {r['plain_ms']:.1f} | "
              f"**{r['ratio']:.2f}** ({r['low']:.2f}–{r['high']:.2f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="run config (default: the demo's)")
    parser.add_argument("--overrides", nargs="*", default=[], help="dotted config overrides for our trainer "
                        "and the plain loop's model and batch")
    parser.add_argument("--shards", type=Path, default=SHARDS)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="world sizes to measure")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=30, help="steps per round and contender")
    add_threads_arg(parser)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # internal: where a child writes rows
    args = parser.parse_args()
    ensure_shards(args.shards)
    if "RANK" in os.environ or args.result is not None:  # a child (or started under torchrun by hand)
        set_threads(args.threads)
        rows = measure(args)
        if args.result is not None and rows:
            args.result.write_text(json.dumps(rows))
        elif rows:
            print_table(rows)
        dist.shutdown()
        return
    rows = []
    tmp = bench_dir("symeq-bench-zero-rows-")
    for world in args.worlds:
        result = tmp / f"world{world}.json"
        child = ["--config", str(args.config), "--shards", str(args.shards), "--rounds", str(args.rounds),
                 "--steps", str(args.steps), "--threads", str(args.threads), "--result", str(result),
                 "--overrides", *args.overrides]
        launch(Path(__file__), child, world=world)
        rows += json.loads(result.read_text())
    remove_dir(tmp)
    print_table(rows)


if __name__ == "__main__":
    main()
