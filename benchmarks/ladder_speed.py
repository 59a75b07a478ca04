"""The reference MNIST ladder's training step: our trainer with its speed settings against a plain fp32 PyTorch
loop of the same game, and what each setting contributes.

Contenders (one process, batch 256 by default, the symmetric game, alternating; interleaved in rounds):

- plain_fp32: the paper's loop shape (`_common.PlainGame`: two modules, two torch.optim.Adam, batches from
  memory), fp32, with torch's stock nn.ConvTranspose2d (bias inside the op): the baseline of the ratios;
- plain_fp32_bias_after: the same loop with our `layers.ConvTranspose2d` (bias added after the op);
- plain_fast: the plain loop with all of our settings (bias after, bf16 autocast, channels-last);
- ours_fp32: the real Trainer at ZeRO-0 with `ds_config.json` (fp32);
- ours_fast: the real Trainer at ZeRO-0 with `configs/ds_config_cpu_autocast.json` and train.channels_last=true.
Both trainers run with the persistent monitoring chain off (`sampling.chain_every=0`, as the plain loop has
none); MI monitors, finiteness checks, logging and the shard stream stay on. `--compile` adds the plain loop
with torch.compile on the conv nets (fp32 and fast; compiling takes a minute or two on 2 cores).

Then the losses: plain_fp32, plain_fast, ours_fp32 and ours_fast trained `--loss-steps` (200) steps from the same
initial weights, plus plain_fp32 with other draws (another noise/sampling seed) for the spread that randomness
alone gives; printed as the mean decoder and encoder loss over the last 20 steps. The trainers read the shard
stream (shuffled), the plain loops the first images in order.

    .venv/bin/python benchmarks/ladder_speed.py              # ~12 min on a quiet 2-core machine
    .venv/bin/python benchmarks/ladder_speed.py --help

Run it on a quiet machine (the ratios are per round, but a busy neighbour hurts 2-thread processes unevenly).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import (
    LADDER_CONFIG,
    ROOT,
    SHARDS,
    PlainGame,
    bench_dir,
    bench_overrides,
    ensure_shards,
    fmt_rounds,
    median,
    ratio,
    remove_dir,
    run_rounds,
    set_threads,
)
from torch import nn

from symeq_dist.api import build_trainer
from symeq_dist.config import load_config
from symeq_dist.data import build_eval_batches
from symeq_dist.models import layers
from symeq_dist.runtime import dist
from symeq_dist.runtime.monitor import setup_logging

FAST = [f"engines.ds_config={ROOT / 'configs' / 'ds_config_cpu_autocast.json'}", "train.channels_last=true"]


def stock_conv_transpose(game: PlainGame) -> PlainGame:
    """The plain loop's decoder with torch's own nn.ConvTranspose2d (same parameters; bias inside the op)."""
    for module in game.decoder.modules():
        if isinstance(module, layers.ConvTranspose2d):
            module.__class__ = nn.ConvTranspose2d
    return game


def compiled(game: PlainGame) -> PlainGame:
    for module in (game.encoder, game.decoder):
        for name in ("trunk", "image_net"):
            if hasattr(module, name):
                setattr(module, name, torch.compile(getattr(module, name)))
    return game


def plain_losses(game: PlainGame, steps: int, last: int = 20) -> tuple[float, float]:
    sums = torch.zeros(2)
    for i in range(steps):
        dec, enc = game.step()
        if i >= steps - last:
            sums += torch.stack([dec, enc]).float()
    return tuple((sums / last).tolist())


def trained_losses(trainer, steps: int) -> tuple[float, float]:
    """Train a fresh Trainer `steps` steps; its last logged interval means (monitor.log_every=20)."""
    last = trainer.train(until=steps)
    trainer.close()
    return last["train/decoder/loss"], last["train/encoder/loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=LADDER_CONFIG)
    parser.add_argument("--shards", type=Path, default=SHARDS)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per round and contender")
    parser.add_argument("--loss-steps", type=int, default=200, help="steps of the loss comparison (0 = skip it)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd plain loops")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's, one per core)")
    args = parser.parse_args()
    ensure_shards(args.shards)
    set_threads(args.threads)
    info = dist.init()
    setup_logging(1)  # warnings only
    tmp = bench_dir("symeq-bench-ladder-")
    total = args.steps * (args.rounds + 1)
    common = [*bench_overrides(args.shards, max(total, args.loss_steps)), f"train.batch_size={args.batch}",
              "engines.encoder.zero_stage=0", "engines.decoder.zero_stage=0", "sampling.chain_every=0",
              "data.num_workers=0", "monitor.log_every=20"]

    def trainer(name: str, *extra: str):
        return build_trainer(load_config(args.config, [f"run_dir={tmp / name}", *common, *extra]), info)

    ours = {"ours_fp32": trainer("ours_fp32"), "ours_fast": trainer("ours_fast", *FAST)}
    cfg = ours["ours_fp32"].cfg
    images = torch.cat([b["image"] for b in build_eval_batches(cfg.data, split=cfg.data.split, batch_size=1024)])
    plains = {"plain_fp32": stock_conv_transpose(PlainGame(cfg, images)),
              "plain_fp32_bias_after": PlainGame(cfg, images),
              "plain_fast": PlainGame(cfg, images, autocast=torch.bfloat16, channels_last=True)}
    if args.compile:
        for name in ("plain_fp32_bias_after", "plain_fast"):
            start = time.perf_counter()
            plains[f"{name}_compiled"] = game = compiled(PlainGame(cfg, images, autocast=plains[name].autocast,
                                                                   channels_last=plains[name].channels_last))
            game.step()  # compiles forward and backward graphs
            print(f"compiled {name}: {time.perf_counter() - start:.0f} s", flush=True)
    contenders = {name: (lambda n, g=g: [g.step() for _ in range(n)]) for name, g in plains.items()}
    contenders.update({name: (lambda n, t=t: t.train(until=t.state.step + n)) for name, t in ours.items()})
    times = run_rounds(contenders, rounds=args.rounds, units=args.steps)
    for t in ours.values():
        t.close()

    print(f"config {args.config.name}, model {cfg.model.kind}, batch {args.batch}, torch threads "
          f"{torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps, chain off")
    for name, values in times.items():
        print(f"  {name:32s} {median(values) * 1e3:8.1f} ms/step   (rounds: {fmt_rounds(values)})")
    for name in times:
        if name != "plain_fp32":
            mid, low, high = ratio(times, "plain_fp32", name)
            print(f"speed-up {name:32s} over plain_fp32: median {mid:.2f}x  (per round {low:.2f} .. {high:.2f})")
    mid, low, high = ratio(times, "plain_fast", "ours_fast")
    print(f"speed-up ours_fast over plain_fast (our overhead at equal settings): {mid:.2f}x ({low:.2f} .. {high:.2f})")

    if args.loss_steps:
        print(f"losses, mean of steps {args.loss_steps - 19}-{args.loss_steps} from the same initial weights "
              "(relative to plain_fp32):")
        runs = {"plain_fp32": lambda: plain_losses(stock_conv_transpose(PlainGame(cfg, images)), args.loss_steps),
                "plain_fp32, other draws": lambda: plain_losses(stock_conv_transpose(PlainGame(cfg, images, seed=2000)),
                                                                args.loss_steps),
                "plain_fast": lambda: plain_losses(PlainGame(cfg, images, autocast=torch.bfloat16, channels_last=True),
                                                   args.loss_steps),
                "ours_fp32": lambda: trained_losses(trainer("ours_fp32_losses"), args.loss_steps),
                "ours_fast": lambda: trained_losses(trainer("ours_fast_losses", *FAST), args.loss_steps)}
        base = None
        for name, run in runs.items():
            dec, enc = run()
            base = base or (dec, enc)
            print(f"  {name:24s} decoder {dec:9.3f} ({dec / base[0] - 1:+.2%})  encoder {enc:8.3f} "
                  f"({enc / base[1] - 1:+.2%})", flush=True)
    remove_dir(tmp)
    dist.shutdown()


if __name__ == "__main__":
    main()
