"""What the hierarchical VAE family costs on this machine: images/s and peak memory per rank (docs/benchmarks.md).

Part 1, the 64² CPU config (`configs/digits64_hvae.yaml`, batch 32, the symmetric game): world size 1 and 2
(torchrun, one thread per rank), both players at ZeRO 0, 2 and 3, activation checkpointing off and on
(`model.checkpoint_cells`); and the ELBO step on the same networks beside the symmetric one (ZeRO-0, world 1).
Part 2, how cost grows: the same family at 32², 64², 128² and 256² (one more stage per doubling: a latent
group at every resolution below the image's, 16 channels wide above 16²), batch 8; and at 64² with 1, 2 and 4
times the latent groups per stage (depth at fixed width). A log-log plot of img/s and memory against pixels
and against groups, with the fitted exponents.

Every setting runs in a fresh process (peak RSS is per process: `ru_maxrss`, libraries + weights + optimiser
state + activations; the max over ranks): the real Trainer (`api.build_trainer`), `--warmup` steps, then
`--rounds` rounds of `--steps` steps, each timed as the slowest rank's; img/s = global batch x steps / time,
median over rounds. Data: the digits-seg canvases (`symeq shards digits-seg --canvas S`, made under --work
for the scaling sizes, 512 canvases each; the 64² table reads data_shards/digits_seg, made if missing).

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/hvae_cost.py                # both parts, ~25 min on 2 cores
    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/hvae_cost.py --parts table --worlds 1
    .venv/bin/python benchmarks/hvae_cost.py --help

Prints markdown tables; with --out also writes rows.json, hvae_cost.md and hvae_scaling.png there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import ROOT, add_threads_arg, bench_dir, bench_overrides, launch, remove_dir, set_threads

CONFIG = ROOT / "configs" / "digits64_hvae.yaml"
SHARDS = ROOT / "data_shards" / "digits_seg"
# resolution -> (width, latent groups) of a stage of the scaled family; the image's own stage has no group
WIDTH = {1: 64, 4: 64, 8: 48, 16: 32}
GROUPS = {1: 1, 4: 2, 8: 2, 16: 2}


def stages(size: int, depth: int = 1) -> str:
    """The `model.stages` override of the family at image side `size` with `depth` x the groups per stage."""
    res = [1, 4, 8, 16] + [2**k for k in range(5, int(math.log2(size)) + 1)]
    res = [r for r in res if r <= size]
    items = []
    for r in res:
        groups = 0 if r == size else depth * GROUPS.get(r, 1)
        items.append(f"{{resolution: {r}, width: {WIDTH.get(r, 16)}, groups: {groups}}}")
    return "model.stages=[" + ", ".join(items) + "]"


def shards_for(size: int, work: Path) -> Path:
    if size == 64:
        out = SHARDS
        count = []
    else:
        out = work / f"digits_seg_{size}"
        count = ["--canvas", str(size), "--num-train", "512", "--num-valid", "64", "--samples-per-shard", "128"]
    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "symeq_dist.cli", "shards", "digits-seg", "--out", str(out), *count],
                       check=True, cwd=ROOT)
    return out


def measure(args: argparse.Namespace) -> None:
    """One setting, this process's rank (collective); rank 0 writes the row to --result."""
    import torch
    import torch.distributed as tdist

    from symeq_dist.api import build_trainer
    from symeq_dist.config import load_config
    from symeq_dist.runtime import dist
    from symeq_dist.runtime.monitor import setup_logging

    info = dist.init()
    setup_logging(1)  # warnings only
    tmp = bench_dir("symeq-bench-hvae-")
    total = args.warmup + args.rounds * args.steps
    cfg = load_config(CONFIG, [f"run_dir={tmp / 'run'}", *bench_overrides(args.shards, total), "data.num_workers=0",
                               "sampling.chain_every=0", *args.overrides])
    trainer = build_trainer(cfg, info)
    trainer.train(until=args.warmup)
    times = []
    for _ in range(args.rounds):
        if info.world_size > 1:
            tdist.barrier()
        start = time.perf_counter()
        trainer.train(until=trainer.state.step + args.steps)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        if info.world_size > 1:
            tdist.all_reduce(elapsed, op=tdist.ReduceOp.MAX)
        times.append(float(elapsed))
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], dtype=torch.float64)  # GiB
    if info.world_size > 1:
        tdist.all_reduce(peak, op=tdist.ReduceOp.MAX)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in trainer.players.items()}
    trainer.close()
    remove_dir(tmp)
    if info.is_main:
        rate = [cfg.train.batch_size * args.steps / t for t in times]
        args.result.write_text(json.dumps({"img_s": statistics.median(rate), "rounds": rate, "peak_gib": float(peak),
                                           "params": params, "world": info.world_size,
                                           "threads": torch.get_num_threads()}))
    dist.shutdown()


def run(setting: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One setting in fresh process(es); its row."""
    result = work / f"row{time.monotonic_ns()}.json"
    child = ["--result", str(result), "--shards", str(setting["shards"]), "--warmup", str(args.warmup),
             "--rounds", str(args.rounds), "--steps", str(setting.get("steps", args.steps)),
             "--threads", str(args.threads), "--overrides", *setting["overrides"]]
    launch(Path(__file__), child, world=setting.get("world", 1))
    row = {**{k: v for k, v in setting.items() if k not in ("overrides", "shards")}, **json.loads(result.read_text())}
    print(json.dumps(row), flush=True)
    return row


def table_settings(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for world in args.worlds:
        for stage in (0, 2, 3):
            for ckpt in (False, True):
                out.append({"part": "table", "world": world, "zero": stage, "checkpoint": ckpt, "game": "symmetric",
                            "shards": SHARDS,
                            "overrides": [f"engines.encoder.zero_stage={stage}", f"engines.decoder.zero_stage={stage}",
                                          f"model.checkpoint_cells={str(ckpt).lower()}"]})
    out.append({"part": "table", "world": 1, "zero": 0, "checkpoint": False, "game": "elbo", "shards": SHARDS,
                "overrides": ["game.kind=elbo"]})
    return out


def scaling_settings(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    out = []
    for size in args.sizes:
        steps = max(2, args.steps * 64 * 64 // (size * size))  # about equal work per round
        out.append({"part": "resolution", "size": size, "depth": 1, "shards": shards_for(size, work), "steps": steps,
                    "overrides": [stages(size), f"model.image_shape=[1, {size}, {size}]", "train.batch_size=8"]})
    for depth in args.depths:
        out.append({"part": "depth", "size": 64, "depth": depth, "shards": shards_for(64, work),
                    "steps": max(2, args.steps // depth),
                    "overrides": [stages(64, depth), "train.batch_size=8"]})
    return out


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares exponent b of y = a x^b."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def report(rows: list[dict[str, Any]], out: Path | None) -> str:
    lines = []
    table = [r for r in rows if r["part"] == "table"]
    if table:
        lines += ["64² config (configs/digits64_hvae.yaml, batch 32), img/s (median of rounds) and peak RSS per rank:",
                  "", "| game | world | ZeRO (both) | activation checkpointing | img/s | peak GiB per rank |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['game']} | {r['world']} | {r['zero']} | {'on' if r['checkpoint'] else 'off'} | "
                  f"{r['img_s']:.1f} | {r['peak_gib']:.2f} |" for r in table]
        sym = next((r for r in table if r["world"] == 1 and r["zero"] == 0 and not r["checkpoint"]
                    and r["game"] == "symmetric"), None)
        elbo = next((r for r in table if r["game"] == "elbo"), None)
        if sym and elbo:
            lines += ["", f"Symmetric step / ELBO step (time per image, ZeRO-0, world 1): "
                      f"{elbo['img_s'] / sym['img_s']:.2f}."]
    for part, key, label in (("resolution", "size", "pixels"), ("depth", "depth", "latent groups x")):
        got = sorted((r for r in rows if r["part"] == part), key=lambda r: r[key])
        if len(got) < 2:
            continue
        xs = [r[key] ** 2 if part == "resolution" else r[key] for r in got]
        lines += ["", f"Scaling with {part} (batch 8):", "",
                  f"| {key} | params (enc + dec) | img/s | peak GiB per rank |", "|---|---|---|---|"]
        lines += [f"| {r[key]} | {sum(r['params'].values()) / 1e6:.2f}M | {r['img_s']:.2f} | {r['peak_gib']:.2f} |"
                  for r in got]
        per_image = slope(xs, [1 / r["img_s"] for r in got])
        lines += ["", f"Fitted exponents against {label}: time per image ~ x^{per_image:.2f}, peak memory ~ "
                  f"x^{slope(xs, [r['peak_gib'] for r in got]):.2f}."]
    text = "\n".join(lines)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "rows.json").write_text(json.dumps(rows, indent=1, default=str))
        (out / "hvae_cost.md").write_text(text + "\n")
        plot(rows, out / "hvae_scaling.png")
    return text


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [(p, k) for p, k in (("resolution", "size"), ("depth", "depth"))
             if sum(r["part"] == p for r in rows) >= 2]  # a fitted line needs two points
    if not parts:
        return
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, (part, key) in zip(axes[0], parts, strict=True):
        got = sorted((r for r in rows if r["part"] == part), key=lambda r: r[key])
        xs = [r[key] ** 2 if part == "resolution" else r[key] for r in got]
        ms = [1e3 / r["img_s"] for r in got]
        ax.loglog(xs, ms, "o-", label=f"ms per image (exponent {slope(xs, ms):.2f})")
        mem = [r["peak_gib"] for r in got]
        ax.loglog(xs, mem, "s--", label=f"peak GiB per rank (exponent {slope(xs, mem):.2f})")
        ax.set_xlabel("pixels per image" if part == "resolution" else "latent groups per stage (x)")
        ax.set_title(f"hvae family vs {part}, batch 8, 2-core CPU")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="table,scaling", help="table and/or scaling")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="steps per round (fewer at larger sizes and depths)")
    p.add_argument("--out", type=Path, help="write rows.json, hvae_cost.md and hvae_scaling.png here")
    add_threads_arg(p)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # internal: one setting, a child process
    p.add_argument("--shards", type=Path, default=SHARDS, help=argparse.SUPPRESS)
    p.add_argument("--overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.result is not None or "RANK" in os.environ:
        set_threads(args.threads)
        measure(args)
        return
    work = bench_dir("symeq-bench-hvae-data-")
    parts = args.parts.split(",")
    settings = table_settings(args) if "table" in parts else []
    if "table" in parts:
        shards_for(64, work)
    if "scaling" in parts:
        settings += scaling_settings(args, work)
    rows = [run(s, args, work) for s in settings]
    remove_dir(work)
    print(report(rows, args.out))


if __name__ == "__main__":
    main()
