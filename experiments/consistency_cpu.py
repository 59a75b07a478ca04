"""Consistency curves on CPU: every table and figure of docs/consistency.md, "Consistency curves on CPU".

    .venv/bin/python experiments/consistency_cpu.py --out /tmp/consistency/cpu --docs docs/consistency_cpu
    .venv/bin/python experiments/consistency_cpu.py --dry-run --out /tmp/consistency/dry     # tiny, ~3 min

For MNIST-5k (`symeq shards mnist`) and Fashion-MNIST (`symeq shards fashion-mnist`, 60k/10k), the MLP VAE of
configs/demo_mnist_mlp.yaml (batch 128, Adam 1e-3, 16 latents; Fashion-MNIST with Gaussian x: model.x_dist=gaussian,
no binarisation, data noise 0.01 N(0,1)) with Gaussian and with Bernoulli latents (model.latent), trained with the
symmetric game and with the ELBO for the same steps, seed 0. Each run trains to the first length, resumes to the
next (`symeq resume`, bitwise the same as one long run): 3k, 10k, 30k steps for MNIST; 3k and 10k for
Fashion-MNIST (30k there would triple its training time). After each length the checkpoint is evaluated with
`symeq eval RUN --step L --n N --chain-steps 0,10,100,1000`: FD-clf of random-code samples and of the limiting
chain after each chain length, the gap, and the consistency diagnostics. Then `symeq compare` draws FD and gap
against the training length (one figure per data set and latent), and the tables are written to
OUT/consistency_cpu.md (figures and tables also copied to --docs).

Every command runs in a subprocess with one torch thread (OMP_NUM_THREADS=1: on a shared 2-core machine two
threads per process are up to 20x slower) and `--jobs` runs at once; wall times are logged in OUT/timings.jsonl.
Rerunning skips what is done (checkpoints and step reports found in OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from symeq_dist.eval.report import chain_fd

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"mnist": ("mnist", []),
            "fashion-mnist": ("fashion_mnist", ["model.x_dist=gaussian", "data.binarize_threshold=null",
                                                "data.noise=gaussian", "data.noise_level=0.01"])}
GAMES = ("symmetric", "elbo")
LATENTS = ("gaussian", "bernoulli")
# Fashion-MNIST stops at 10k: 30k would triple the training time of its four runs (docs/consistency.md says so)
LENGTHS = {"mnist": "3000,10000,30000", "fashion-mnist": "3000,10000"}


@dataclass(frozen=True)
class Run:
    dataset: str
    latent: str
    game: str

    @property
    def name(self) -> str:
        return f"{self.dataset}_{self.latent}_{self.game}"


def symeq(args: list[str], log: Path) -> float:
    """Run `symeq ARGS` with this checkout's code on one thread, output to `log`; the wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ symeq {' '.join(args)}\n")
        out.flush()
        done = subprocess.run([sys.executable, "-m", "symeq_dist.cli", *args], env=env, stdout=out,
                              stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"symeq {' '.join(args)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - start


def prepare_data(args: argparse.Namespace) -> dict[str, Path]:
    """Shards and the FD-clf network of each data set (once, before runs start in parallel)."""
    shards = {}
    for dataset in args.datasets:
        out = args.shards / DATASETS[dataset][0]
        symeq(["shards", dataset, "--out", str(out)], args.out / "data.log")
        if not (out / "classifier.pt").is_file():
            epochs = ["--epochs", "1"] if args.dry_run else []
            symeq(["eval", "train-features", str(out), *epochs], args.out / "data.log")
        shards[dataset] = out
    return shards


def overrides(run: Run, args: argparse.Namespace, shards: Path) -> list[str]:
    tiny = ["model.hidden=32", "model.num_latents=4", "train.batch_size=16"] if args.dry_run else []
    return [f"run_dir={args.out / 'runs' / run.name}", f"data.shards={shards}", "seed=0", f"game.kind={run.game}",
            f"model.latent={run.latent}", *DATASETS[run.dataset][1], *tiny, "monitor.progress=false",
            f"checkpoint.every={args.lengths[run.dataset][-1]}",
            f"checkpoint.keep_last={len(args.lengths[run.dataset]) + 1}",
            f"engines.ds_config={ROOT / 'ds_config.json'}"]


def pipeline(run: Run, args: argparse.Namespace, shards: Path) -> list[dict[str, Any]]:
    """Train to each length in turn and evaluate that checkpoint; one timing record per length."""
    run_dir, log = args.out / "runs" / run.name, args.out / "logs" / f"{run.name}.log"
    records = []
    for i, length in enumerate(args.lengths[run.dataset]):
        record: dict[str, Any] = {"run": run.name, "step": length, "train_s": 0.0, "eval_s": 0.0}
        if not (run_dir / "checkpoints" / f"step_{length:08d}" / "meta.json").is_file():
            command = (["train", str(ROOT / "configs" / "demo_mnist_mlp.yaml"), *overrides(run, args, shards)] if i == 0
                       or not (run_dir / "checkpoints" / "latest").is_file() else ["resume", str(run_dir)])
            record["train_s"] = symeq([*command, f"train.steps={length}"], log)
        if not (run_dir / "eval" / f"step_{length:08d}" / "report.json").is_file():
            record["eval_s"] = symeq(["eval", str(run_dir), "--step", str(length), "--n", str(args.n), "--chain-steps",
                                      ",".join(map(str, args.chain_steps)), "--batch-size", "500",
                                      "--tsne-points", str(args.tsne_points)], log)
        records.append(record)
        with open(args.out / "timings.jsonl", "a") as out:  # kept across reruns: a rerun skips (0 s) what is done
            out.write(json.dumps(record) + "\n")
        print(f"{run.name} step {length}: train {record['train_s']:.0f} s, eval {record['eval_s']:.0f} s", flush=True)
    return records


def _report(run_dir: Path, step: int) -> dict[str, Any]:
    return json.loads((run_dir / "eval" / f"step_{step:08d}" / "report.json").read_text())


def _cell(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def tables(runs: list[Run], args: argparse.Namespace, timings: dict[str, Any]) -> str:
    """The markdown of docs/consistency.md's CPU section: FD per chain length, diagnostics, wall times."""
    lengths = args.chain_steps
    fd_rows, diag_rows = [], []
    for run in runs:
        for step in args.lengths[run.dataset]:
            r = _report(args.out / "runs" / run.name, step)
            net = next(iter(r["fd"]))
            fd = r["fd"][net]
            chain = [chain_fd(r, net, k) for k in lengths]
            fd_rows.append(f"| {run.dataset} | {run.latent} | {run.game} | {step} | {fd['random_code']:.1f} | "
                           + " | ".join(_cell(c) for c in chain) + f" | {chain[-1] - fd['random_code']:.1f} | "
                           f"{fd['reconstruction']:.1f} |")
            d = r["diagnostics"]
            enc, dec = d["joint_nll"]["encoder"], d["joint_nll"]["decoder"]["x"]
            top = enc[d["codes"]["latent"]]
            codes, post = d["codes"], d["posterior"]
            code_fd = [codes.get(s, {}).get("fd_to_prior") for s in
                       ("prior_resampled", "posterior_data", "posterior_dreams", f"chain@{lengths[-1]}")]
            diag_rows.append(
                f"| {run.dataset} | {run.latent} | {run.game} | {step} | {top['dreams']:.3f} | {top['data']:.3f} | "
                f"{top['gap']:.3f} | {dec['gap']:.4f} | {post['data']['variance']:.3f} | "
                f"{post['dreams']['variance']:.3f} | " + " | ".join(_cell(c, 2) for c in code_fd) + " |")
    header = ("| data | latent | game | step | random code | " + " | ".join(f"chain {k}" for k in lengths)
              + f" | gap {lengths[-1]} | reconstruction |")
    lines = ["## FD-clf against the training length", "", header, "|" + "---|" * (7 + len(lengths)), *fd_rows, "",
             "## Diagnostics", "",
             "| data | latent | game | step | enc NLL dreams | enc NLL data | enc gap | dec x gap | post var data | "
             "post var dreams | code FD: prior again | q on data | q on dreams | chain "
             f"{lengths[-1]} |", "|" + "---|" * 14, *diag_rows, "", "## Wall times (s)", "",
             "| run | step | train | eval |", "|---|---|---|---|"]
    measured: dict[tuple[str, int], dict[str, float]] = {}  # the run that did the work, not a rerun's skip
    for line in (args.out / "timings.jsonl").read_text().splitlines():
        t = json.loads(line)
        row = measured.setdefault((t["run"], t["step"]), {"train_s": 0.0, "eval_s": 0.0})
        for key in row:
            row[key] = t[key] or row[key]
    lines += [f"| {run} | {step} | {t['train_s']:.0f} | {t['eval_s']:.0f} |" for (run, step), t in measured.items()]
    total = sum(t["train_s"] + t["eval_s"] for t in measured.values())
    lines += ["", f"Sum of the per-run wall times {total / 3600:.2f} h (runs in parallel: --jobs {args.jobs})."]
    dirty = f" plus uncommitted changes ({len(timings['uncommitted'])} files)" if timings["uncommitted"] else ""
    lines += [f"Wall time of this invocation {timings['wall_s'] / 3600:.2f} h; commit {timings['commit']}{dirty}; "
              f"started {timings['started']}.", ""]
    return "\n".join(lines)


def figures(args: argparse.Namespace) -> None:
    """`symeq compare` per data set and latent: table, bars of the last step, FD and gap against the length."""
    for dataset in args.datasets:
        for latent in args.latents:
            dirs = [str(args.out / "runs" / Run(dataset, latent, g).name) for g in args.games]
            symeq(["compare", *dirs, "--out", str(args.out / "figures" / f"{dataset}_{latent}")],
                  args.out / "logs" / "compare.log")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/consistency/cpu"), help="runs, logs, tables, figures")
    p.add_argument("--shards", type=Path, default=None,
                   help="where the shards and their FD-clf networks are (written; default data_shards, OUT/shards "
                        "with --dry-run, whose 1-epoch networks must not land beside the real shards)")
    p.add_argument("--docs", type=Path, default=None, help="also copy the figures and tables here")
    p.add_argument("--lengths", action="append", default=[], metavar="[DATASET=]L1,L2,...",
                   help="training lengths whose checkpoints are evaluated, for every data set or for one (repeat "
                        f"the option); default {', '.join(f'{d}={v}' for d, v in LENGTHS.items())}")
    p.add_argument("--chain-steps", default="0,10,100,1000")
    p.add_argument("--n", type=int, default=2000, help="samples per generated set")
    p.add_argument("--tsne-points", type=int, default=500)
    p.add_argument("--datasets", default="mnist,fashion-mnist")
    p.add_argument("--latents", default=",".join(LATENTS))
    p.add_argument("--games", default=",".join(GAMES))
    p.add_argument("--jobs", type=int, default=2, help="runs trained/evaluated at once (one thread each)")
    p.add_argument("--dry-run", action="store_true", help="tiny models, 20/40 steps, n 40, chains 0,2,5")
    args = p.parse_args(argv)
    if args.shards is None:
        args.shards = args.out / "shards" if args.dry_run else ROOT / "data_shards"
    if args.dry_run:
        args.lengths, args.chain_steps, args.n, args.tsne_points = ["20,40"], "0,2,5", 40, 20
    lengths = dict(LENGTHS)
    for spec in args.lengths:
        dataset, _, values = spec.rpartition("=")
        for name in [dataset] if dataset else list(lengths):
            lengths[name] = values
    args.lengths = {name: [int(v) for v in values.split(",")] for name, values in lengths.items()}
    args.chain_steps = [int(v) for v in str(args.chain_steps).split(",")]
    args.datasets, args.latents = args.datasets.split(","), args.latents.split(",")
    args.games = args.games.split(",")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for sub in ("runs", "logs", "figures"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True).stdout.split("\n")
    timings: dict[str, Any] = {"commit": commit, "uncommitted": [line for line in changed if line.strip()],
                               "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv,
                               "records": []}
    start = time.perf_counter()
    shards = prepare_data(args)
    runs = [Run(d, latent, g) for d in args.datasets for latent in args.latents for g in args.games]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for records in pool.map(lambda run: pipeline(run, args, shards[run.dataset]), runs):
            timings["records"] += records
    figures(args)
    timings["wall_s"] = time.perf_counter() - start
    (args.out / "timings.json").write_text(json.dumps(timings, indent=1))
    text = tables(runs, args, timings)
    (args.out / "consistency_cpu.md").write_text(text)
    print(text)
    if args.docs is not None:
        args.docs.mkdir(parents=True, exist_ok=True)
        for path in [*(args.out / "figures").glob("*.png"), *(args.out / "figures").glob("*.md"),
                     args.out / "consistency_cpu.md"]:
            shutil.copy(path, args.docs / path.name)


if __name__ == "__main__":
    main()
