"""Parameters of the shipped hierarchical-VAE configs, and what their weights and optimiser state take per rank
at each ZeRO stage (arithmetic from the counted parameters, not a measurement: activations come on top).

    .venv/bin/python benchmarks/hvae_sizes.py [--world 8] [configs/*_hvae.yaml ...]

Per parameter, with bf16 weights and Adam (DeepSpeed's mixed precision): bf16 weight 2 B, bf16 gradient 2 B,
fp32 master weight 4 B, Adam m and v 8 B; fp32 runs keep weight 4 B, gradient 4 B, Adam 8 B. ZeRO-1 shards the
optimiser state (master weights and Adam) over the ranks, ZeRO-2 also the gradients, ZeRO-3 also the weights.
The EMA (train.ema_decay) adds an fp32 copy: 4 B, sharded at ZeRO-3 like the weights.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import torch

from symeq_dist.config import load_config
from symeq_dist.models import build_players

ROOT = Path(__file__).resolve().parents[1]


def per_rank_bytes(params: int, stage: int, world: int, bf16: bool, ema: bool) -> float:
    weight, grad, optim = (2, 2, 12) if bf16 else (4, 4, 8)
    shard = [(1, 1, 1), (1, 1, world), (1, world, world), (world, world, world)][stage]
    total = weight / shard[0] + grad / shard[1] + optim / shard[2] + (4 / shard[0] if ema else 0)
    return params * total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="*", type=Path)
    ap.add_argument("--world", type=int, default=8, help="ranks the state is sharded over (default 8)")
    args = ap.parse_args()
    paths = args.configs or sorted(Path(p) for p in glob.glob(str(ROOT / "configs" / "*_hvae.yaml")))
    print(f"| config | encoder params | decoder params | latent groups | per rank, GiB: ZeRO 0 / 1 / 2 / 3 "
          f"(world {args.world}, both players, bf16 + Adam + EMA) |")
    print("|---|---|---|---|---|")
    for path in paths:
        cfg = load_config(path, [])
        torch.manual_seed(0)
        enc, dec = build_players(cfg.model)
        counts = [sum(p.numel() for p in m.parameters()) for m in (enc, dec)]
        groups = sum(stage.groups for stage in cfg.model.stages)
        gib = [per_rank_bytes(sum(counts), s, args.world, bf16=True, ema=cfg.train.ema_decay > 0) / 2**30
               for s in range(4)]
        print(f"| {path.name} | {counts[0] / 1e6:.2f}M | {counts[1] / 1e6:.2f}M | {groups} | "
              f"{' / '.join(f'{g:.3f}' for g in gib)} |")


if __name__ == "__main__":
    main()
