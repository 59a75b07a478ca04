"""The reference ladder's collapsed plateau on CPU: how long it lasts and what shortens it (docs/consistency.md).

    .venv/bin/python experiments/ladder_plateau.py --out /tmp/plateau --shards /tmp/consistency/shards/mnist \\
        --docs docs/consistency_cpu
    .venv/bin/python experiments/ladder_plateau.py --dry-run --out /tmp/plateau_dry     # tiny, ~1 min

Trains configs/mnist_ladder.yaml (Bernoulli 30/100 bits, alternating symmetric game, seed 0) at batch 128 on
MNIST-5k for --steps steps, once per variant below (the paper's lr 1e-4 first, then one change each), and reads
the mutual-information monitors back from each run's TensorBoard events: the encoder's I(x; z0) per bit and the
decoder's I(z1; x) per pixel (METHOD §13.3; both ~0 at the collapsed equilibrium), and the decoder's pixel NLL
per dimension against the data's marginal entropy. A variant has left the plateau at the first logged step
from which the encoder's z0 MI stays above --escape nats per bit to the end of the run. Writes
OUT/ladder_plateau.md (table) and OUT/ladder_plateau.png (MI against the step, one line per variant); --docs
copies both.

Every run is a subprocess with one torch thread; --jobs run at once. Rerunning skips finished runs.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from consistency_cpu import ROOT, symeq  # same directory: one way to run a command

# name -> (what changes, overrides); every variant keeps the game, the model and the data
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "paper": ("paper's setting: Adam lr 1e-4 both players, flip noise 0.001", []),
    "paper_seed1": ("paper's setting, seed 1 (init, data order, noise): how far one seed moves", ["seed=1"]),
    "lr1e-3": ("lr 1e-3 both players", ["engines.encoder.lr=1e-3", "engines.decoder.lr=1e-3"]),
    "enc_lr1e-3": ("encoder lr 1e-3, decoder 1e-4", ["engines.encoder.lr=1e-3"]),
    "noise0.05": ("flip noise 0.05 (data.noise_level)", ["data.noise_level=0.05"]),
    "x_marginal": ("decoder's pixel logits offset by the data's per-pixel marginal (model.x_offset=data_marginal)",
                   ["model.x_offset=data_marginal"]),
    "init_gain3": ("both players' weights initialised 3x larger (model.init_gain=3)", ["model.init_gain=3"]),
}
TAGS = {"enc_mi_z0": "train/encoder/mi/z0_mean", "dec_mi_x": "train/decoder/mi/x_mean",
        "dec_mi_z1": "train/decoder/mi/z1_mean", "x_nll": "train/decoder/nll_per_dim/x"}


def train(name: str, args: argparse.Namespace) -> float:
    run_dir = args.out / "runs" / name
    if (run_dir / "checkpoints" / f"step_{args.steps:08d}" / "meta.json").is_file():
        return 0.0
    tiny = ["model.num_z0=4", "model.num_z1=8", "model.trunk_width=16", "model.mlp_width=16"] if args.dry_run else []
    return symeq(["train", str(ROOT / "configs" / "mnist_ladder.yaml"), f"run_dir={run_dir}",
                  f"data.shards={args.shards}", "train.batch_size=128", f"train.steps={args.steps}",
                  f"monitor.log_every={args.log_every}", "monitor.progress=false",
                  f"monitor.image_every={args.steps}", f"checkpoint.every={args.steps}",
                  *VARIANTS[name][1], *tiny], args.out / "logs" / f"{name}.log")


def marginal_entropy(shards: Path, threshold: int, n: int = 4500) -> float:
    """Mean per-pixel entropy (nats) of the binarised training images: a decoder that ignores z reaches it."""
    import torch

    from symeq_dist.data.manifest import load_manifest
    from symeq_dist.data.stream import iter_eval_batches

    batches = iter_eval_batches(shards, load_manifest(shards), split="train", batch_size=500)
    x = torch.cat([batch["image"] for batch in batches])[:n]
    p = (x >= threshold).double().mean(0).clamp(1e-6, 1 - 1e-6)
    return float((-(p * p.log() + (1 - p) * (1 - p).log())).mean())


def series(name: str, args: argparse.Namespace) -> dict[str, list[tuple[int, float]]]:
    """The monitored scalars of one run, read back from its TensorBoard events: key -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(args.out / "runs" / name / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    present = set(events.Tags()["scalars"])
    return {key: [(e.step, e.value) for e in events.Scalars(tag)] if tag in present else []
            for key, tag in TAGS.items()}


def escape_step(s: dict[str, list[tuple[int, float]]], threshold: float) -> int | None:
    """The first logged step from which the encoder's z0 MI stays above `threshold` to the end of the run (a
    large initialisation starts above it and then decays into the plateau: that is not an escape)."""
    escaped = None
    for step, value in s["enc_mi_z0"]:
        if value <= threshold:
            escaped = None
        elif escaped is None:
            escaped = step
    return escaped


def table(names: list[str], args: argparse.Namespace, walls: dict[str, float], entropy: float) -> str:
    at = sorted({args.steps // 4, args.steps // 2, args.steps})
    head = ("| variant | change | left the plateau at | " + " | ".join(f"enc MI z0 @{s}" for s in at) + " | "
            + " | ".join(f"dec MI x @{s}" for s in at) + f" | x NLL/dim @{args.steps} | train s |")
    lines = [head, "|" + "---|" * (5 + 2 * len(at))]
    for name in names:
        s = series(name, args)
        pick = {k: dict(v) for k, v in s.items()}
        esc = escape_step(s, args.escape)
        cells = [f"{pick['enc_mi_z0'].get(t, math.nan):.4f}" for t in at]
        cells += [f"{pick['dec_mi_x'].get(t, math.nan):.5f}" for t in at]
        lines.append(f"| {name} | {VARIANTS[name][0]} | {esc if esc is not None else f'not by {args.steps}'} | "
                     + " | ".join(cells) + f" | {pick['x_nll'].get(args.steps, math.nan):.4f} | "
                     f"{walls.get(name, 0):.0f} |")
    lines += ["", f"Marginal entropy of the binarised training pixels: {entropy:.4f} nats/pixel (a decoder that "
              f"ignores z sits there). Left the plateau: encoder z0 MI above {args.escape} nats/bit from that step "
              "to the end."]
    return "\n".join(lines)


def figure(names: list[str], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in names:
        s = series(name, args)
        for ax, key in zip(axes, ("enc_mi_z0", "dec_mi_x", "x_nll"), strict=True):
            if s[key]:
                ax.plot([t for t, _ in s[key]], [v for _, v in s[key]], label=name)
    for ax, title in zip(axes, ("encoder I(x; z0), nats/bit", "decoder I(z1; x), nats/pixel",
                                "decoder pixel NLL, nats/pixel"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("iteration")
    axes[0].set_yscale("symlog", linthresh=1e-4)
    axes[1].set_yscale("symlog", linthresh=1e-5)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Reference ladder, batch 128, MNIST-5k, seed 0 unless named ({args.steps} iterations)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/plateau"), help="runs, logs, table, figure")
    p.add_argument("--shards", type=Path, default=ROOT / "data_shards" / "mnist",
                   help="MNIST shards (`symeq shards mnist --out DIR`; made there if missing)")
    p.add_argument("--docs", type=Path, default=None, help="also copy the table and figure here")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--escape", type=float, default=0.01, help="nats per bit of the encoder's z0 MI")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--dry-run", action="store_true", help="tiny networks, 20 steps")
    args = p.parse_args(argv)
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.dry_run:
        args.steps, args.log_every = 20, 5
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for sub in ("runs", "logs"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    if not (args.shards / "manifest.json").is_file():
        symeq(["shards", "mnist", "--out", str(args.shards)], args.out / "logs" / "data.log")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    started, start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    walls_path = args.out / "walls.json"

    def load_walls() -> dict[str, Any]:  # re-read before each write: another invocation may have added runs
        return json.loads(walls_path.read_text()) if walls_path.is_file() else {}

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for name, wall in zip(args.variants, pool.map(lambda n: train(n, args), args.variants), strict=True):
            if wall:
                walls_path.write_text(json.dumps({**load_walls(), name: wall}, indent=1))
    walls = load_walls()
    manifest = json.loads((args.shards / "manifest.json").read_text())
    entropy = marginal_entropy(args.shards, int(manifest.get("binarize_threshold_hint", 112)))
    text = table(args.variants, args, walls, entropy)
    text += (f"\n\nCommit {commit.strip()}; started {started}; this invocation {time.perf_counter() - start:.0f} s "
             f"(--jobs {args.jobs}; train s per run above, 0 = reused).\n")
    (args.out / "ladder_plateau.md").write_text(text)
    figure(args.variants, args, args.out / "ladder_plateau.png")
    print(text)
    if args.docs is not None:
        args.docs.mkdir(parents=True, exist_ok=True)
        for path in (args.out / "ladder_plateau.md", args.out / "ladder_plateau.png"):
            shutil.copy(path, args.docs / path.name)


if __name__ == "__main__":
    main()
