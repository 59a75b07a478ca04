"""The GPU check behind benchmarks/gpu_check.sh: real `symeq train` runs on one GPU, measured, as a report.

1. NCCL: a tiny run at world size 1 must say "accelerator cuda:0 (nccl)".
2. bf16 at ZeRO-2 and at ZeRO-3 for both players (configs/ds_config_gpu_multinode.json, per-player stages).
3. The 256x256 hierarchical config (configs/ffhq256_hvae.yaml) on stand-in shards for a few hundred steps:
   images/s, peak memory per rank, and an MFU estimate (FLOPs of one training step counted by
   torch.utils.flop_counter, x steps/s, / the GPU's dense bf16 peak).
Everything lands in --out (report.md, report.json, each run's log). --dry-run: CPU and tiny sizes, to check the
script itself where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = {"H200": 989.5, "H100": 989.5, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense, no sparsity


def stand_in(out: Path, side: int, num: int) -> Path:
    """RGB images of smooth random blobs (compressible, so writing is fast), 10 labels, train/valid."""
    from symeq_dist.datasets.packed import write_shards

    if (out / "manifest.json").is_file():
        return out
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side] / side
    def images(n: int) -> np.ndarray:
        centres = rng.random((n, 3, 2, 1, 1))
        blobs = np.exp(-((yy - centres[:, :, 0]) ** 2 + (xx - centres[:, :, 1]) ** 2) * 20)
        return (blobs * 255).astype(np.uint8)  # (n, 3, side, side)
    splits = {"train": (images(num), rng.integers(0, 10, num)),
              "valid": (images(num // 4), rng.integers(0, 10, num // 4))}
    write_shards(out, splits, dataset="standin", samples_per_shard=max(1, num // 4), meta={})
    return out


def train(name: str, out: Path, config: str, overrides: list[str], timeout: int) -> dict:
    """`symeq train` in a subprocess; returns what its log says (accelerator, losses, img/s, peak memory)."""
    run_dir = out / "runs" / name
    cmd = [sys.executable, "-m", "symeq_dist.cli", "train", config, f"run_dir={run_dir}", "monitor.progress=false",
           *overrides]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=os.environ.copy())
    seconds = time.perf_counter() - start
    log = done.stdout + done.stderr
    (out / f"{name}.log").write_text(" ".join(cmd) + "\n" + log)
    steps = re.findall(r"step (\d+)/\d+ \| (.*?) \| (\d+) img/s", log)
    peak = re.search(r"peak memory after the first step, per rank \((.*?)\): (.*)", log)
    accel = re.search(r"accelerator (\S+) \((\w+)\)", log)
    return {"name": name, "ok": done.returncode == 0, "seconds": round(seconds, 1),
            "accelerator": accel.groups() if accel else None, "last_log": steps[-1][1] if steps else None,
            "img_per_s": [int(s[2]) for s in steps], "peak_memory": peak.group(2) if peak else None,
            "error": None if done.returncode == 0 else log.strip().splitlines()[-1][:500]}


def step_flops(config: str, overrides: list[str], batch: int, device: str) -> float:
    """FLOPs of one symmetric-game step (wake, decoder loss + backward, dream, encoder loss + backward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from symeq_dist import game
    from symeq_dist.config import load_config
    from symeq_dist.models import build_players
    from symeq_dist.priors import build_prior

    cfg = load_config(config, overrides)
    players = build_players(cfg.model)
    for _, module in players.items():
        module.to(device)
    prior = build_prior(cfg.prior, players.decoder)
    symmetric = game.build_game(cfg.game, players, prior)
    x = torch.rand(batch, *cfg.model.image_shape, device=device)
    gens = {p: torch.Generator(device=device).manual_seed(0) for p in ("wake", "dream")}
    with FlopCounterMode(display=False) as counter:
        rnd = game.Round(x=x, num_dreams=batch, gens=gens)
        for loss in symmetric.losses.values():
            loss(rnd).loss.backward()
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script only")
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    small = stand_in(out / "shards32", 32, 256)
    big_side = 32 if dry else 256
    big = stand_in(out / f"shards{big_side}", big_side, 64 if dry else 1024)
    gpu_ds = str(ROOT / ("ds_config.json" if dry else "configs/ds_config_gpu_multinode.json"))
    smoke = ["model.kind=hvae", "model.image_shape=[3,32,32]", "model.x_dist=logistic_mixture",
             "data.binarize_threshold=null", "data.noise=none", f"data.shards={small}", "train.batch_size=16",
             "monitor.log_every=5", "checkpoint.every=1000", "sampling.num_chains=2", "monitor.image_every=1000"]
    empty = out / "defaults.yaml"
    empty.write_text("{}\n")
    results = [train("nccl_world1", out, str(empty), [*smoke, "train.steps=10"], 240)]
    for stage in (2, 3):
        results.append(train(f"bf16_zero{stage}", out, str(empty), [
            *smoke, "train.steps=20", f"engines.ds_config={gpu_ds}", f"engines.encoder.zero_stage={stage}",
            f"engines.decoder.zero_stage={stage}"], 300))
    ffhq = str(ROOT / "configs" / "ffhq256_hvae.yaml")
    big_over = [f"data.shards={big}", "data.num_workers=2", f"engines.ds_config={gpu_ds}", "monitor.log_every=20",
                "checkpoint.every=100000", "monitor.image_every=100000", "sampling.num_chains=2"]
    if dry:
        big_over += ["model.image_shape=[3,32,32]", "model.stages=[{resolution: 1, width: 16, groups: 1}, "
                     "{resolution: 8, width: 16, groups: 1}, {resolution: 32, width: 8, groups: 1}]",
                     "train.batch_size=4", "train.steps=20"]
    else:
        big_over += ["train.steps=300"]
    results.append(train("ffhq256", out, ffhq, big_over, 420))
    report = {"results": results, "dry_run": dry}
    try:
        import torch

        from symeq_dist.config import load_config

        device = "cpu" if dry else "cuda"
        cfg = load_config(ffhq, big_over)
        micro = cfg.train.batch_size
        flops = step_flops(ffhq, big_over, micro, device)
        name = "cpu" if dry else torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        rate = results[-1]["img_per_s"][-1] if results[-1]["img_per_s"] else None
        report["ffhq256_flops_per_step"] = flops
        report["ffhq256_mfu"] = (flops / micro * rate / (peak * 1e12)) if (peak and rate) else None
        report["device"] = name
    except Exception as err:  # the report still says what happened
        report["mfu_error"] = f"{type(err).__name__}: {err}"
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = ["# GPU check", "", f"device: {report.get('device')}; dry run: {dry}", "",
             "| run | ok | s | accelerator | img/s (last) | peak memory | last losses |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        last = (r["last_log"] or r["error"] or "").replace("|", ";")  # a log line has its own bars
        lines.append(f"| {r['name']} | {r['ok']} | {r['seconds']} | {r['accelerator']} | "
                     f"{(r['img_per_s'] or ['n/a'])[-1]} | {r['peak_memory']} | {last} |")
    lines += ["", f"MFU estimate (ffhq256): {report.get('ffhq256_mfu')}; FLOPs/step "
              f"{report.get('ffhq256_flops_per_step')}; {report.get('mfu_error', '')}"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
