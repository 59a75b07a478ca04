"""docs/structured.md, the semi-supervised table: configs/mnist_semi.yaml with 10, 100 and all labels per class on
MNIST-5k and on Fashion-MNIST, symmetric game, each run evaluated by `symeq eval RUN --n N --chain-steps 100`
(accuracy of argmax q(c|x) on the held-out split, FD-clf of random-code and chain samples, the class-conditional
grid eval/classes.png and the class-coloured t-SNE eval/tsne_classes.png). Finished steps are skipped when rerun.

    .venv/bin/python experiments/semi_supervised.py [--out runs/semi] [--steps 6000] [--n 2000] [--sets mnist ...]

Wall time on the 2-core CPU machine: about 5 minutes per run and 1 per evaluation (6 runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _steps import Steps

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (10, 100, -1)
DATA = {"mnist": [], "fashion-mnist": ["data.binarize_threshold=null", "model.x_dist=gaussian",
                                       "data.noise=gaussian", "data.noise_level=0.01"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "semi")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--sets", nargs="+", default=list(DATA), choices=list(DATA))
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    step = Steps(out)
    times = step.times

    rows = []
    for data in args.sets:
        shards = out / data
        step(f"shards_{data}", shards / "manifest.json", "shards", data, "--out", str(shards))
        step(f"features_{data}", shards / "classifier.pt", "eval", "train-features", str(shards))
        for budget in BUDGETS:
            name = f"{data}_{'all' if budget < 0 else budget}"
            run = out / name
            step(name, run / "checkpoints" / "latest", "train", str(ROOT / "configs" / "mnist_semi.yaml"),
                 f"run_dir={run}", f"data.shards={shards}", f"data.labels_per_class={budget}",
                 f"train.steps={args.steps}", "monitor.progress=false", *DATA[data])
            step(f"eval_{name}", run / "eval" / "report.json", "eval", str(run), "--n", str(args.n),
                 "--chain-steps", "100")
            report = json.loads((run / "eval" / "report.json").read_text())
            fd = next(iter(report["fd"].values()))
            rows.append((data, budget, report["class_accuracy"]["accuracy"], report["class_accuracy"]["n"],
                         fd["random_code"], fd["limiting_chain"], times.get(name, float("nan"))))
            grids = args.docs / "structured"
            grids.mkdir(parents=True, exist_ok=True)
            for figure in ("classes", "tsne_classes"):
                if (run / "eval" / f"{figure}.png").is_file():
                    shutil.copyfile(run / "eval" / f"{figure}.png", grids / f"{figure}_{name}.png")
    lines = ["| data | labels per class | accuracy of argmax q(c\\|x) | held-out images | FD-clf random code | "
             "FD-clf chain 100 | training wall time, s |", "|---|---|---|---|---|---|---|"]
    for data, budget, acc, n, fd_random, fd_chain, wall in rows:
        lines.append(f"| {data} | {'all' if budget < 0 else budget} | {acc:.4f} | {n} | {fd_random:.2f} | "
                     f"{fd_chain:.2f} | {wall:.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
