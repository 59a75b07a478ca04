"""Process group and ranks: the ONLY package reader of RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*.

`init()` reads the environment once (torchrun, the launcher or SLURM set it; a bare process falls back
to a one-rank group on loopback) and returns a `DistInfo` that is passed around explicitly.
Must not import models.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import logging
import os
import socket
import sys
import types
from dataclasses import dataclass

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _use_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def local_device() -> torch.device:
    """The device of a single-process job (`symeq eval`, `symeq sample`): this process's GPU when CUDA is
    available and DS_ACCELERATOR is not "cpu" (cuda:LOCAL_RANK, default 0), else the CPU."""
    if _use_cuda():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init(timeout_s: float = 600.0) -> DistInfo:
    """Initialise torch.distributed once (gloo on CPU, NCCL on CUDA) and return this process's ranks.

    Without RANK in the environment this is a one-process run: loopback address and a free port are set
    so DeepSpeed does not go looking for MPI (STACK.md).
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if _use_cuda():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, rank=rank, world_size=world,
                                 timeout=datetime.timedelta(seconds=timeout_s))
        # Torn down at process exit, not by library calls: DeepSpeed caches the groups, so several runs in
        # one process (tests, notebooks) must keep the first process group.
        atexit.register(shutdown)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory so far: CUDA's max allocated on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def backend() -> str:
    """The process group's backend ("gloo", "nccl"); "none" before `init`."""
    return tdist.get_backend() if tdist.is_initialized() else "none"


def shutdown() -> None:
    """Destroy every process group and join gloo's threads; idempotent, and run by `atexit` after `init`.

    This must finish before the interpreter finalizes. When a gloo worker thread finishes a collective it frees
    the work's tensors, and a tensor whose Python object went first needs the GIL to be freed. A thread that
    waits for the GIL when finalization begins is ended with pthread_exit, and unwinding through gloo's
    destructors calls std::terminate: "terminate called without an active exception" (SIGABRT, exit 134)
    after a finished run. `destroy_process_group` does not stop gloo's threads (gloo's shutdown is a no-op);
    they are joined when the last reference to a group goes. So DeepSpeed's cached groups are released too
    (deepspeed.comm's destroy), stale groups in default arguments are dropped (`_drop_group_defaults`), and the
    engines' reference cycles are collected.
    """
    if tdist.is_initialized():
        ds_comm = sys.modules.get("deepspeed.comm")
        if ds_comm is not None and ds_comm.is_initialized():
            ds_comm.destroy_process_group()  # also drops deepspeed.utils.groups' cached groups
        else:
            tdist.destroy_process_group()
        _drop_group_defaults()
    gc.collect()


def _drop_group_defaults() -> None:
    """Replace destroyed process groups in functions' default arguments by None.

    `def f(..., group=torch.distributed.group.WORLD)` in a module imported after `init` keeps the WORLD group
    alive for the life of the process: torch.distributed.nn.functional and DeepSpeed's TorchBackend.barrier
    do this (both import lazily, after `init`). None means the default group in both APIs.
    """
    for obj in gc.get_objects():
        if type(obj) is not types.FunctionType:  # not isinstance: it dereferences dead weak proxies (torch.compile's)
            continue
        if obj.__defaults__ and any(isinstance(d, tdist.ProcessGroup) for d in obj.__defaults__):
            obj.__defaults__ = tuple(None if isinstance(d, tdist.ProcessGroup) else d for d in obj.__defaults__)
        if obj.__kwdefaults__ and any(isinstance(d, tdist.ProcessGroup) for d in obj.__kwdefaults__.values()):
            obj.__kwdefaults__ = {k: None if isinstance(d, tdist.ProcessGroup) else d
                                  for k, d in obj.__kwdefaults__.items()}


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        tdist.barrier()


def all_reduce(tensor: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum, mean or max); a no-op at world size 1."""
    if info.world_size > 1:
        red = {"sum": tdist.ReduceOp.SUM, "mean": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX}[op]
        tdist.all_reduce(tensor, op=red)
        if op == "mean":
            tensor /= info.world_size
    return tensor


def all_gather(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate equally shaped tensors of all ranks along dim 0."""
    if info.world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(info.world_size)]
    tdist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's `obj` on every rank."""
    if info.world_size == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def reduce_stats(stats: dict[str, torch.Tensor], info: DistInfo) -> dict[str, float]:
    """Mean of each scalar over ranks with ONE stacked all-reduce; returns Python floats (rank 0 logs them)."""
    if not stats:
        return {}
    keys = sorted(stats)
    stacked = torch.stack([stats[k].detach().float().reshape(()) for k in keys])
    all_reduce(stacked, info, op="mean")
    return dict(zip(keys, stacked.tolist(), strict=True))


def agree_any(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is true on any rank (one tiny all-reduce)."""
    if info.world_size == 1:
        return flag
    return bool(all_reduce(torch.tensor([float(flag)], device=info.device), info, op="max").item())
