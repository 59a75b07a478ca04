"""Time per training step: the symmetric game (two engines) vs the ELBO baseline (one joint engine).

Both contenders are the real Trainer (`symeq_dist.api.build_trainer`) on the same config, model, batch and
shard stream, ZeRO-0, world size 1, one process, interleaved in rounds; only `game.kind` differs:

- symmetric: wake sample, decoder engine step, dream from the updated decoder, encoder engine step;
- elbo: one reparametrised (Gaussian) or ZGR (Bernoulli) sample, one backward through both players, one
  joint engine step (plus a no-grad dream every `monitor.mi_every` steps for the decoder's MI monitor).

The persistent monitoring chain is off for both by default (`sampling.chain_every=0`; it costs the same
forwards in either game and is measured in step_overhead.py); `--chain` keeps the config's setting.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/game_vs_elbo.py                   # demo MLP VAE, ~1 min
    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/game_vs_elbo.py --config configs/mnist_ladder.yaml \\
        --overrides model.trunk_width=64 model.mlp_width=64 train.batch_size=64 data.num_workers=0
                         # small ladder HVAE (conv trunk: ~0.6 s/step on 1 thread, ~9 min at the defaults)
    .venv/bin/python benchmarks/game_vs_elbo.py --help

Prints ms/step of each (median of rounds) and the ratio elbo / symmetric as the median of the per-round
ratios (a slow spell of the shared machine hits both contenders of a round alike).
"""

from __future__ import annotations

import argparse
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
    remove_dir,
    run_rounds,
    set_threads,
)

from symeq_dist.api import build_trainer
from symeq_dist.config import load_config
from symeq_dist.runtime import dist
from symeq_dist.runtime.monitor import setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="run config (default: the demo's)")
    parser.add_argument("--overrides", nargs="*", default=[], help="dotted config overrides for both contenders")
    parser.add_argument("--shards", type=Path, default=SHARDS)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40, help="steps per round and contender")
    parser.add_argument("--chain", action="store_true",
                        help="keep the config's persistent monitoring chain (default: sampling.chain_every=0)")
    add_threads_arg(parser)
    args = parser.parse_args()
    ensure_shards(args.shards)
    set_threads(args.threads)
    info = dist.init()
    setup_logging(1)  # warnings only
    tmp = bench_dir("symeq-bench-elbo-")
    common = [*bench_overrides(args.shards, args.steps * (args.rounds + 1)),
              "engines.encoder.zero_stage=0", "engines.decoder.zero_stage=0",
              *([] if args.chain else ["sampling.chain_every=0"]), *args.overrides]
    trainers = {kind: build_trainer(load_config(args.config, [f"run_dir={tmp / kind}", *common, f"game.kind={kind}"]),
                                    info)
                for kind in ("symmetric", "elbo")}
    contenders = {kind: (lambda n, t=t: t.train(until=t.state.step + n)) for kind, t in trainers.items()}
    times = run_rounds(contenders, rounds=args.rounds, units=args.steps)
    for trainer in trainers.values():
        trainer.close()
    remove_dir(tmp)
    cfg = trainers["symmetric"].cfg
    params = sum(p.numel() for name in ("encoder", "decoder")
                 for p in getattr(trainers["symmetric"].engines, name).parameters())
    print(f"config {args.config.name} {' '.join(args.overrides)}".rstrip())
    print(f"model {cfg.model.kind} ({params / 1e6:.2f}M parameters), batch {cfg.train.batch_size}, "
          f"chain_every={cfg.sampling.chain_every}, torch threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds x {args.steps} steps")
    for kind, values in times.items():
        print(f"  {kind:10s} {median(values) * 1e3:8.2f} ms/step   (rounds: {fmt_rounds(values)})")
    mid, low, high = ratio(times, "elbo", "symmetric")
    print(f"ratio elbo / symmetric: median {mid:.3f}  (per round {low:.3f} .. {high:.3f})")
    dist.shutdown()


if __name__ == "__main__":
    main()
