"""Loop of 2-rank launcher runs that counts aborts at exit (issue 10 #14: "terminate called without an active
exception", rank killed by SIGABRT, launcher exit 134, after a finished run).

Each run is `symeq-launch --nproc-per-node 2 configs/debug_cpu.yaml` with the settings of the test that saw it
(tests/test_faults.py nan-simultaneous: NaN drill on rank 1 at step 3, simultaneous schedule, 6 steps,
checkpoints at 3 and 6). `--concurrent 2` runs two loops at once (the report's two concurrent jobs).
`--inject` makes the race certain instead of rare: rank 1 leaves a gloo all_reduce in flight at exit and its
last atexit handler holds the GIL (see tests/test_exit.py); without the fix every run aborts.

    .venv/bin/python benchmarks/exit_loop.py --runs 50 --shards /tmp/abort/shards      # ~10 s a run on 2 cores
    .venv/bin/python benchmarks/exit_loop.py --runs 3 --inject --shards /tmp/abort/shards
    .venv/bin/python benchmarks/exit_loop.py --help

Prints one line per failed run (its log stays under --out) and the counts with the wall time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_exit import IN_FLIGHT_AT_EXIT  # noqa: E402


def one_run(index: int, args: argparse.Namespace, env: dict[str, str]) -> str:
    """'ok', 'abort' or 'fail' for one launcher run; the run directory is removed unless it failed."""
    run = args.out / f"run{index:03d}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    cmd = [sys.executable, "-m", "launcher", "--nproc-per-node", "2", str(ROOT / "configs" / "debug_cpu.yaml"),
           f"run_dir={run / 'run'}", f"data.shards={args.shards}", f"engines.ds_config={ROOT / 'ds_config.json'}",
           "train.steps=6", "checkpoint.every=3", "monitor.progress=false", "game.schedule=simultaneous",
           f"data.num_workers={args.num_workers}", *args.overrides]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    (run / "log").write_text(proc.stdout)
    aborted = "terminate called" in proc.stdout or re.search(r"killed by SIGABRT", proc.stdout) is not None
    if aborted or proc.returncode != 0:
        print(f"run {index}: {'ABORT' if aborted else 'FAIL'} (exit {proc.returncode}), log {run / 'log'}",
              flush=True)
        return "abort" if aborted else "fail"
    shutil.rmtree(run)
    return "ok"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="launcher runs in all (default 50)")
    parser.add_argument("--concurrent", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--shards", type=Path, default=ROOT / "data_shards" / "mnist",
                        help="MNIST shards (`symeq shards mnist --out DIR`)")
    parser.add_argument("--num-workers", type=int, default=0, help="data.num_workers (default 0, as the test)")
    parser.add_argument("--fault", default="nan:3:1", help="SYMEQ_FAULT drill (default nan:3:1; '' for none)")
    parser.add_argument("--inject", action="store_true", help="make the exit race certain (see above)")
    parser.add_argument("--out", type=Path, default=None, help="run directories (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="more overrides for every run")
    args = parser.parse_args()
    args.out = args.out or Path(tempfile.mkdtemp(prefix="exit_loop_"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "SLURM_JOB_ID", "SLURM_PROCID")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), SYMEQ_FAULT=args.fault)
    if args.inject:
        inject = args.out / "inject"
        inject.mkdir(parents=True, exist_ok=True)
        (inject / "sitecustomize.py").write_text(IN_FLIGHT_AT_EXIT)
        env["PYTHONPATH"] = f"{inject}{os.pathsep}{ROOT}"
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrent) as pool:
        results = list(pool.map(lambda i: one_run(i, args, env), range(1, args.runs + 1)))
    wall = time.perf_counter() - start
    print(f"{args.runs} runs ({args.concurrent} at once): {results.count('abort')} aborted at exit, "
          f"{results.count('fail')} other failures, {results.count('ok')} ok; wall {wall:.0f} s "
          f"({wall / args.runs:.1f} s a run)")


if __name__ == "__main__":
    main()
