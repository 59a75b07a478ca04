"""What drawing pi(z) costs per game step: closed form vs a diffusion prior (fresh or buffered) vs latent shards.

The real Trainer (ZeRO-0, one process, the demo config: MLP VAE, 16-d Gaussian top, batch 128) with
- `closed`: the standard prior N(0, I) (the default);
- `model`: prior.kind=model, a diffusion prior (configs/prior_diffusion.yaml: width 256, 3 blocks, 50 DDIM
  steps), sampled fresh every step: 50 denoiser passes over 128 codes per step;
- `model/k`: the same with prior.refresh_every=k (one sampling pass over k x 128 codes every k steps);
- `model@10`: the same prior drawn with 10 DDIM steps (prior.sample_steps=10);
- `shards`: prior.kind=shards, codes streamed from a latent shard set.
The prior's weights do not change its cost, so it is trained for one step only. Contenders run interleaved in
rounds; the ratio to `closed` is the median of the per-round ratios.

    .venv/bin/python benchmarks/prior_cost.py [--rounds 5] [--steps 64] [--refresh 8 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from symeq_dist.api import build_trainer  # noqa: E402
from symeq_dist.config import load_config  # noqa: E402
from symeq_dist.data import load_manifest  # noqa: E402
from symeq_dist.datasets.codes import write_code_set  # noqa: E402
from symeq_dist.datasets.mnist import write_mnist_shards  # noqa: E402
from symeq_dist.runtime import dist  # noqa: E402
from symeq_dist.runtime.monitor import setup_logging  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=ROOT / "data_shards" / "mnist")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64, help="steps per round and contender")
    parser.add_argument("--refresh", type=int, nargs="*", default=[8, 32], help="prior.refresh_every values")
    args = parser.parse_args()
    try:
        load_manifest(args.shards)
    except FileNotFoundError:
        write_mnist_shards(args.shards)
    tmp = Path(tempfile.mkdtemp(prefix="symeq-prior-cost-"))
    codes = tmp / "codes"
    rng = np.random.default_rng(0)
    write_code_set(codes, dataset="codes", family="gaussian", meta={},
                   codes={s: rng.normal(size=(n, 16)).astype(np.float32) for s, n in (("train", 8192), ("valid", 512))})
    prior = tmp / "prior"
    subprocess.run([sys.executable, "-m", "symeq_dist.cli", "prior", "train",
                    str(ROOT / "configs/prior_diffusion.yaml"), f"run_dir={prior}", f"data.shards={codes}",
                    "train.steps=1", "monitor.progress=false"], check=True, cwd=ROOT, capture_output=True)
    info = dist.init()
    setup_logging(1)
    per_round = args.steps
    total = per_round * (args.rounds + 1) + 1
    common = [f"data.shards={args.shards}", f"train.steps={total}", "monitor.progress=false", "data.num_workers=0",
              "monitor.image_every=1000000", "checkpoint.every=1000000", "monitor.log_every=100",
              "sampling.chain_every=0"]
    variants = {"closed": [], "model": ["prior.kind=model", f"prior.run={prior}"],
                **{f"model/{k}": ["prior.kind=model", f"prior.run={prior}", f"prior.refresh_every={k}"]
                   for k in args.refresh},
                "model@10": ["prior.kind=model", f"prior.run={prior}", "prior.sample_steps=10"],
                "shards": ["prior.kind=shards", f"prior.shards={codes}"]}
    trainers = {name: build_trainer(load_config(ROOT / "configs/demo_mnist_mlp.yaml",
                                                [f"run_dir={tmp / name.replace('/', '_')}", *common, *extra]), info)
                for name, extra in variants.items()}
    for trainer in trainers.values():  # warm-up round
        trainer.train(until=trainer.state.step + per_round)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train(until=trainer.state.step + per_round)
            times[name].append((time.perf_counter() - start) / per_round)
    for trainer in trainers.values():
        trainer.close()
    print(f"demo MLP VAE, batch 128, 1 process, torch threads {torch.get_num_threads()}, {args.rounds} rounds x "
          f"{per_round} steps (multiples of every refresh_every: a round holds whole refills)")
    for name, values in times.items():
        ratios = sorted(v / c for v, c in zip(values, times["closed"], strict=True))
        print(f"  {name:10s} {statistics.median(values) * 1e3:8.2f} ms/step   x{statistics.median(ratios):.2f} the "
              f"closed form (per round {ratios[0]:.2f} .. {ratios[-1]:.2f})")
    dist.shutdown()


if __name__ == "__main__":
    main()
