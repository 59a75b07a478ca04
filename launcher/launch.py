"""`symeq-launch`: start this node's training processes and supervise them. No training logic here.

    symeq-launch --nproc-per-node 2 configs/debug_cpu.yaml train.steps=100      # one machine
    symeq-launch --prior --nproc-per-node 2 configs/prior_diffusion.yaml ...     # a prior model (symeq prior train)
    srun --ntasks-per-node=1 symeq-launch configs/x.yaml run_dir=runs/x          # under SLURM, per node

Standalone: one node, rendezvous on 127.0.0.1 and a free port. Under SLURM (SLURM_JOB_ID and SLURM_PROCID
set, one launcher task per node): the SLURM environment is read once here, nodes = SLURM_JOB_NUM_NODES,
node rank = SLURM_NODEID, the rendezvous address is the first node's address (its `NodeAddr` from
`scontrol show node`, because emulated or unresolvable node names hang gloo) and the port is
20000 + SLURM_JOB_ID % 10000, the same on every node and stable across requeues.

Every rank gets the same absolute run directory (`run_dir=` of the config or overrides; `{job_id}` in it
becomes SLURM_JOB_ID) and, when that directory already holds a checkpoint, `resume=true`: a requeued job
continues where it stopped. Supervision: SIGUSR1/SIGTERM/SIGINT are forwarded to the ranks (they
checkpoint and exit 75); when a rank exits with an error, the others get `--grace` seconds to fail on
their own (their collectives break) and are then killed; the launcher exits with the first failure's code
and a line naming the rank. A rank that hangs makes the others fail after `fault.collective_timeout_s`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

EXIT_REQUEUE = 75  # symeq_dist.train.preemption.EXIT_REQUEUE (not imported: the launcher needs no torch)
PREEMPTED_FILE = "PREEMPTED"  # symeq_dist.train.preemption.PREEMPTED_FILE
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Layout:
    nnodes: int
    node_rank: int
    nproc: int
    master_addr: str
    master_port: int
    job_id: str | None = None

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True, timeout=30).stdout


def slurm_master_addr(nodelist: str) -> str:
    """The first node's NodeAddr (an IP where the node name does not resolve), else its host name."""
    first = _scontrol("show", "hostnames", nodelist).split()[0]
    for field in _scontrol("show", "node", first).split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return first


def layout_from_env(env: dict[str, str], nproc: int | None) -> Layout:
    """Read the SLURM (or local) environment once."""
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:
        nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES", "1"))
        ntasks = int(env.get("SLURM_NTASKS", str(nnodes)))
        if ntasks != nnodes:
            raise SystemExit(f"symeq-launch: error: {ntasks} SLURM tasks on {nnodes} nodes; run one launcher per "
                             "node (srun --ntasks-per-node=1); it starts --nproc-per-node ranks itself")
        gpus = env.get("SLURM_GPUS_ON_NODE")
        nproc = nproc or (int(gpus) if gpus and gpus.isdigit() and int(gpus) > 0 else 1)
        job_id = env["SLURM_JOB_ID"]
        addr = env.get("MASTER_ADDR") or slurm_master_addr(env["SLURM_JOB_NODELIST"])
        port = int(env.get("MASTER_PORT") or 20000 + int(job_id) % 10000)
        return Layout(nnodes, int(env.get("SLURM_NODEID", "0")), nproc, addr, port, job_id)
    return Layout(1, 0, nproc or 1, "127.0.0.1", int(env.get("MASTER_PORT") or _free_port()))


def resolve_run_dir(config: str, overrides: list[str], job_id: str | None, prior: bool = False) -> Path:
    """The run directory every rank gets: the last `run_dir=` override, else the config's, made absolute."""
    run_dir = None
    for item in overrides:
        if item.startswith("run_dir="):
            run_dir = item.split("=", 1)[1]
    if run_dir is None:
        from symeq_dist.config import PriorRunConfig, RunConfig, load_config  # YAML only; no torch.distributed state

        run_dir = load_config(config, [], cls=PriorRunConfig if prior else RunConfig).run_dir
    if "{job_id}" in run_dir:
        if job_id is None:
            raise SystemExit(f"symeq-launch: error: run_dir {run_dir!r} uses {{job_id}} outside a SLURM job; "
                             "give run_dir=... explicitly")
        run_dir = run_dir.replace("{job_id}", job_id)
    return Path(run_dir).resolve()


def rank_commands(args: argparse.Namespace, layout: Layout, run_dir: Path) -> list[tuple[list[str], dict]]:
    overrides = [o for o in args.overrides if not o.startswith("run_dir=")] + [f"run_dir={run_dir}"]
    has_checkpoint = (run_dir / "checkpoints" / "latest").is_file()
    if has_checkpoint and args.auto_resume and not any(o.startswith("resume=") for o in overrides):
        overrides.append("resume=true")
        print(f"symeq-launch: {run_dir} holds a checkpoint: resuming (resume=true)", file=sys.stderr, flush=True)
    command = ["prior", "train"] if args.prior else ["train"]
    cmd = [sys.executable, "-m", "symeq_dist.cli", *command, args.config, *overrides]
    threads = max(1, (os.cpu_count() or 1) // layout.nproc)
    out = []
    for local in range(layout.nproc):
        env = {**os.environ, "RANK": str(layout.node_rank * layout.nproc + local), "LOCAL_RANK": str(local),
               "WORLD_SIZE": str(layout.world_size), "LOCAL_WORLD_SIZE": str(layout.nproc),
               "GROUP_RANK": str(layout.node_rank), "MASTER_ADDR": layout.master_addr,
               "MASTER_PORT": str(layout.master_port)}
        env.setdefault("OMP_NUM_THREADS", str(threads))
        out.append((cmd, env))
    return out


def _describe(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def supervise(procs: list[subprocess.Popen], first_rank: int, grace: float) -> int:
    """Wait for the ranks; forward signals; on the first failure give the rest `grace` s, then kill them."""
    def forward(signum: int, frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        failure, deadline = None, None
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            if failure is None:
                for i, code in enumerate(codes):
                    if code not in (None, 0, EXIT_REQUEUE):
                        failure = (first_rank + i, code)
                        print(f"symeq-launch: error: rank {first_rank + i} {_describe(code)}; stopping the other "
                              f"ranks of this node (they get {grace:.0f} s to fail on their own)", file=sys.stderr,
                              flush=True)
                        deadline = time.monotonic() + grace
                        break
            if deadline is not None and time.monotonic() > deadline:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
                deadline = None
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [p.returncode for p in procs]
    if failure is None:
        failure = next(((first_rank + i, c) for i, c in enumerate(codes) if c not in (0, EXIT_REQUEUE)), None)
    if failure is not None:
        rank, code = failure
        print(f"symeq-launch: error: the run failed: rank {rank} {_describe(code)} (exit codes of this node's "
              f"ranks: {codes}); see the rank logs above", file=sys.stderr, flush=True)
        return code if code > 0 else 128 - code
    if EXIT_REQUEUE in codes:
        print(f"symeq-launch: ranks checkpointed on a preemption signal; exiting {EXIT_REQUEUE} (requeue me)",
              file=sys.stderr, flush=True)
        return EXIT_REQUEUE
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="symeq-launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="run config YAML (as for `symeq train`)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 run_dir=runs/x")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks on this node (default: SLURM_GPUS_ON_NODE under SLURM, else 1)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds the other ranks get to exit after one failed, before they are killed (default 30)")
    p.add_argument("--no-auto-resume", dest="auto_resume", action="store_false",
                   help="do not add resume=true when the run directory already holds a checkpoint")
    p.add_argument("--prior", action="store_true",
                   help="start `symeq prior train CONFIG` (a prior model, accelerate) instead of `symeq train`")
    p.add_argument("--dry-run", action="store_true", help="print the rank commands and environment, start nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    layout = layout_from_env(dict(os.environ), args.nproc_per_node)
    run_dir = resolve_run_dir(args.config, args.overrides, layout.job_id, prior=args.prior)
    commands = rank_commands(args, layout, run_dir)
    if layout.node_rank == 0:
        (run_dir / PREEMPTED_FILE).unlink(missing_ok=True)  # written again only if this run is preempted
    first_rank = layout.node_rank * layout.nproc
    print(f"symeq-launch: node {layout.node_rank}/{layout.nnodes}, ranks {first_rank}..{first_rank + layout.nproc - 1}"
          f" of {layout.world_size}, rendezvous {layout.master_addr}:{layout.master_port}, run_dir {run_dir}",
          file=sys.stderr, flush=True)
    if args.dry_run:
        for cmd, env in commands:
            keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
            print(" ".join(f"{k}={env[k]}" for k in keys), shlex.join(cmd))
        return 0
    procs = [subprocess.Popen(cmd, env=env) for cmd, env in commands]
    code = supervise(procs, first_rank, args.grace)
    if code == EXIT_REQUEUE and layout.job_id is not None:
        # Under srun --kill-on-bad-exit a non-zero exit of the first node would kill the others while they
        # exit; the sbatch script requeues on <run_dir>/PREEMPTED instead.
        print(f"symeq-launch: SLURM job {layout.job_id}: exiting 0; {run_dir / PREEMPTED_FILE} asks for the "
              "requeue", file=sys.stderr, flush=True)
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
