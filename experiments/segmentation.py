"""docs/structured.md, the image + segmentation model: configs/digits_seg_symeq.yaml on the embedded digits-seg
canvases with 1.0, 0.1 and 0.01 of the training images labelled (pi(s) draws the labelled maps in each run), each
run evaluated by `symeq eval RUN --n N --chain-steps 100 --trained-weights` (mIoU and pixel accuracy of argmax
q(s|x) on the whole held-out split, the cycle score on the same maps, FD-clf of random-code and chain samples, the
Fig. 3 grid eval/style_transfer.png and the Fig. 4 rows eval/segmentation_rows.png, copied to docs/structured/).
Finished steps are skipped when rerun.

    .venv/bin/python experiments/segmentation.py [--out runs/seg] [--steps 3000] [--n 200] [--fractions 0.1 ...]

Wall time on the 2-core CPU machine: about 25 minutes per run (bf16 autocast) and 8 per evaluation (the 100-step
chain of --n images is most of it).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _steps import Steps

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (1.0, 0.1, 0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "seg")
    parser.add_argument("--shards", type=Path, default=ROOT / "data_shards" / "digits_seg")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    out, shards = args.out.resolve(), args.shards.resolve()
    out.mkdir(parents=True, exist_ok=True)
    step = Steps(out)
    step("shards", shards / "manifest.json", "shards", "digits-seg", "--out", str(shards))
    step("features", shards / "classifier.pt", "eval", "train-features", str(shards))
    rows = []
    for fraction in args.fractions:
        name = f"labelled_{fraction:g}"
        run = out / name
        step(name, run / "checkpoints" / "latest", "train", str(ROOT / "configs" / "digits_seg_symeq.yaml"),
             f"run_dir={run}", f"data.shards={shards}", f"data.labelled_fraction={fraction}",
             f"train.steps={args.steps}", "monitor.progress=false")
        step(f"eval_{name}", run / "eval" / "report.json", "eval", str(run), "--n", str(args.n),
             "--chain-steps", "100", "--trained-weights")  # the config keeps no averages; a run that did is read alike
        report = json.loads((run / "eval" / "report.json").read_text())
        seg, fd = report["segmentation"], next(iter(report["fd"].values()))
        rows.append((fraction, seg, fd["random_code"], fd["limiting_chain"], step.times.get(name, float("nan"))))
        grids = args.docs / "structured"
        grids.mkdir(parents=True, exist_ok=True)
        for figure in ("style_transfer", "segmentation_rows"):
            shutil.copyfile(run / "eval" / f"{figure}.png", grids / f"{figure}_{name}.png")
    lines = ["| labelled fraction | mIoU of argmax q(s\\|x) | pixel accuracy | cycle mIoU | cycle pixel accuracy | "
             "held-out images | FD-clf random code | FD-clf chain 100 | training wall time, s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for fraction, seg, fd_random, fd_chain, wall in rows:
        lines.append(f"| {fraction:g} | {seg['miou']:.4f} | {seg['pixel_accuracy']:.4f} | {seg['cycle_miou']:.4f} | "
                     f"{seg['cycle_pixel_accuracy']:.4f} | {seg['n']} | {fd_random:.2f} | {fd_chain:.2f} | "
                     f"{wall:.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
