"""docs/priors.md: the two-stage scenario on the embedded MNIST data, every number from one run of this script.

Gaussian top (the demo's MLP VAE, 16-d N(0, I) prior, symmetric game):
  A        `symeq train configs/demo_mnist_mlp.yaml` for S steps (standard prior)
  codes    `symeq prior codes A` (z ~ q(z|x) of the train and valid splits)
  P        `symeq prior train configs/prior_diffusion.yaml` on those codes
  A+P      A's decoder with P's samples as random codes (`symeq eval A --prior P`): the classical two-stage VAE
  A2       A continued S2 more steps with the standard prior (the compute of B without the prior)
  B        A continued S2 more steps by the symmetric game with pi := P's samples (`prior.kind=model`)
  B0       trained from scratch for S + S2 steps with pi := P's samples
Bernoulli top (the same MLP with 16 bits, uniform prior): Abits, its codes, a MADE prior M, Abits+M.

Each run is evaluated with `symeq eval RUN --n N --chain-steps 10,1000` (FD-clf of random-code and limiting-chain
samples against the held-out digits); grids by `symeq sample`. Finished steps are skipped when rerun.

    .venv/bin/python experiments/priors_two_stage.py [--out runs/priors] [--steps 6000] [--more 3000] [--n 5000]

Wall time on the 2-core CPU machine, one process at a time: about 45 minutes with the defaults (B0 alone 17).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _steps import Steps

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "priors")
    parser.add_argument("--steps", type=int, default=6000, help="S: steps of A (and Abits)")
    parser.add_argument("--more", type=int, default=3000, help="S2: steps of A2 and B after A")
    parser.add_argument("--prior-steps", type=int, default=3000)
    parser.add_argument("--n", type=int, default=5000, help="samples per FD set")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where priors.md's table and grids go")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    step = Steps(out)
    times = step.times

    shards = out / "mnist"
    step("shards", shards / "manifest.json", "shards", "mnist", "--out", str(shards))
    step("features", shards / "classifier.pt", "eval", "train-features", str(shards))
    demo = str(ROOT / "configs" / "demo_mnist_mlp.yaml")
    common = [f"data.shards={shards}", "monitor.progress=false", "checkpoint.every=1000"]
    total = args.steps + args.more
    runs = {"A": [f"train.steps={args.steps}"],
            "A2": [f"train.init_from={out / 'A'}", f"train.steps={args.more}"],
            "Abits": [f"train.steps={args.steps}", "model.latent=bernoulli"]}
    for name in ("A", "Abits"):
        step(name, out / name / "checkpoints" / "latest", "train", demo, f"run_dir={out / name}", *common, *runs[name])
    step("codes", out / "codes" / "manifest.json", "prior", "codes", str(out / "A"), "--out", str(out / "codes"))
    step("codes_bits", out / "codes_bits" / "manifest.json", "prior", "codes", str(out / "Abits"), "--out",
         str(out / "codes_bits"))
    prior_common = ["monitor.progress=false", f"train.steps={args.prior_steps}"]
    step("P", out / "P" / "checkpoints" / "latest", "prior", "train", str(ROOT / "configs" / "prior_diffusion.yaml"),
         f"run_dir={out / 'P'}", f"data.shards={out / 'codes'}", *prior_common)
    step("M", out / "M" / "checkpoints" / "latest", "prior", "train", str(ROOT / "configs" / "prior_made.yaml"),
         f"run_dir={out / 'M'}", f"data.shards={out / 'codes_bits'}", *prior_common)
    with_p = ["prior.kind=model", f"prior.run={out / 'P'}"]
    runs.update({"B": [f"train.init_from={out / 'A'}", f"train.steps={args.more}", *with_p],
                 "B0": [f"train.steps={total}", *with_p]})
    for name in ("A2", "B", "B0"):
        step(name, out / name / "checkpoints" / "latest", "train", demo, f"run_dir={out / name}", *common, *runs[name])
    for prior_run, codes in (("P", "codes"), ("M", "codes_bits")):
        step(f"prior_eval_{prior_run}", out / f"prior_eval_{prior_run}.json", "prior", "eval", str(out / prior_run),
             "--codes", str(out / codes), "--n", str(args.n), "--json", str(out / f"prior_eval_{prior_run}.json"))
    evals = {"A": ("A", None), "A+P": ("A", "P"), "A2": ("A2", None), "B": ("B", None), "B0": ("B0", None),
             "Abits": ("Abits", None), "Abits+M": ("Abits", "M")}
    reports = {}
    for row, (run, prior) in evals.items():
        tag = "eval_" + row.replace("+", "_")
        extra = ["--prior", str(out / prior)] if prior else []
        step(tag, out / f"{tag}.json", "eval", str(out / run), "--n", str(args.n), "--chain-steps", "10,1000", *extra)
        sub = f"-prior-{prior}" if prior else ""
        if not (out / f"{tag}.json").exists():
            step_dir = sorted((out / run / "eval").glob(f"step_*{sub}"))[-1] if prior else (out / run / "eval")
            shutil.copyfile(step_dir / "report.json", out / f"{tag}.json")
        reports[row] = json.loads((out / f"{tag}.json").read_text())
        for mode in ("random", "limiting"):
            grid = out / f"grid_{row.replace('+', '_')}_{mode}.png"
            step(f"grid_{row}_{mode}", grid, "sample", str(out / run), "--mode", mode, "--steps", "1000", "--n", "64",
                 "--out", str(grid), *extra)
    write_table(out, reports, times, args)


def write_table(out: Path, reports: dict[str, dict], times: dict[str, float], args: argparse.Namespace) -> None:
    """The markdown table of docs/priors.md and the grids under docs/priors/."""
    compute = {"A": ["A"], "A+P": ["A", "codes", "P"], "A2": ["A", "A2"], "B": ["A", "codes", "P", "B"],
               "B0": ["A", "codes", "P", "B0"], "Abits": ["Abits"], "Abits+M": ["Abits", "codes_bits", "M"]}
    steps = {"A": args.steps, "A+P": args.steps, "A2": args.steps + args.more, "B": args.steps + args.more,
             "B0": args.steps + args.more, "Abits": args.steps, "Abits+M": args.steps}
    lines = ["| row | game steps | wall time of everything it needs, s | FD-clf random code | FD-clf chain 10 | "
             "FD-clf chain 1000 | FD-clf reconstruction |", "|---|---|---|---|---|---|---|"]
    for row, report in reports.items():
        fd = next(iter(report["fd"].values()))
        wall = sum(times.get(part, float("nan")) for part in compute[row])
        lines.append(f"| {row} | {steps[row]} | {wall:.0f} | {fd['random_code']:.2f} | {fd['limiting_chain@10']:.2f} | "
                     f"{fd['limiting_chain@1000']:.2f} | {fd['reconstruction']:.2f} |")
    for name in ("P", "M"):
        path = out / f"prior_eval_{name}.json"
        if path.is_file():
            r = json.loads(path.read_text())
            lines += ["", f"`symeq prior eval {name}` ({r['kind']}, {r['n']} held-out codes):", "",
                      "| samples | FD in code space | mean abs. error of per-dim. means | of std. devs. |",
                      "|---|---|---|---|"]
            for key, label in (("prior", name), ("closed_form", "closed form"), ("training_codes", "training codes")):
                if r.get(key):
                    lines.append(f"| {label} | {r[key]['fd']:.4f} | {r[key]['mean_abs_err']:.4f} | "
                                 f"{r[key]['std_abs_err']:.4f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    grids = args.docs / "priors"
    grids.mkdir(parents=True, exist_ok=True)
    for png in out.glob("grid_*.png"):
        shutil.copyfile(png, grids / png.name)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
