"""Per-rank memory of each engine at ZeRO-0 vs ZeRO-3, two ranks, the reference MNIST ladder HVAE.

For each stage the script launches `python -m torch.distributed.run --standalone --nproc_per_node 2`
(= torchrun) on itself; each rank builds the real Trainer (`configs/mnist_ladder.yaml`, 3.0M parameters,
both players at the stage, global batch 128 = micro 64 per rank, in-process stream) and trains a few
steps. Just before each engine's `step()` of the last iteration (gradients present, Adam state allocated)
it counts the bytes of every tensor storage the engine holds, found by walking the engine, its module's
parameters (`param.data`, `param.grad`, and at ZeRO-3 the partition `param.ds_tensor`), its optimizer
and the wrapped torch optimizer (`optimizer.state`, DeepSpeed's flat partitions and buffers, found by
walking the attributes of `engine.optimizer`, e.g. stage 3's `fp16_partitioned_groups_flat`,
`fp32_partitioned_groups_flat`, `grad_partitions_flat_buffer`, `ipg_buckets[dtype].buffer`), each storage
once, sorted into:

- params: module parameter data, ZeRO-3 partitions (`ds_tensor`) and fp32 master partitions;
- grads: `param.grad` and DeepSpeed's gradient partitions;
- optimizer: the tensors of the torch optimizer's `state` (Adam exp_avg, exp_avg_sq, step);
- buffers: any other tensor the engine or its optimizer holds (reduce buckets, ...).

"model states" = params + grads + optimizer. Sizes are nominal (what was allocated): a CPU `torch.empty`
that is never written costs address space, not resident memory. Peak RSS is the process's
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`): libraries, activations and both engines together.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/zero_memory.py             # ~1-2 min
    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/zero_memory.py --verbose   # also the largest storages
    .venv/bin/python benchmarks/zero_memory.py --help

Prints per rank, stage and engine the bytes of each kind, peak RSS per rank, and the ratios ZeRO-3 / ZeRO-0.
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path
from typing import Any

import torch
from _common import LADDER_CONFIG, SHARDS, bench_dir, bench_overrides, ensure_shards, launch, remove_dir
from torch import nn

from symeq_dist.api import build_trainer
from symeq_dist.config import load_config
from symeq_dist.runtime import dist
from symeq_dist.runtime.monitor import setup_logging

KINDS = ("params", "grads", "optimizer", "buffers")
MiB = 2**20


class StorageCensus:
    """Tensor storages reachable from one engine, each counted once, under the first kind that claims it."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[str, str, int]] = {}  # storage address -> (kind, path, bytes)

    def add(self, tensor: Any, kind: str, path: str) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.is_meta:
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in self.seen:
            return
        self.seen[storage.data_ptr()] = (kind, path, storage.nbytes())

    def walk(self, obj: Any, kind: str, path: str, depth: int, visited: set[int]) -> None:
        """Every tensor under containers and DeepSpeed objects (not modules: their parameters come first)."""
        if isinstance(obj, torch.Tensor):
            self.add(obj, kind, path)
            return
        if depth < 0 or id(obj) in visited or isinstance(obj, (nn.Module, str, bytes, int, float, bool)):
            return
        visited.add(id(obj))
        if isinstance(obj, dict):
            for i, (key, value) in enumerate(obj.items()):
                label = f"<param {i}: {tuple(key.shape)}>" if isinstance(key, torch.Tensor) else repr(key)
                self.walk(value, kind, f"{path}[{label}]", depth - 1, visited)
        elif isinstance(obj, (list, tuple, set)):
            for i, value in enumerate(obj):
                self.walk(value, kind, f"{path}[{i}]", depth - 1, visited)
        elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
            for key, value in vars(obj).items():
                self.walk(value, kind, f"{path}.{key}", depth - 1, visited)

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for kind, _, size in self.seen.values():
            out[kind] += size
        return out

    def largest(self, n: int) -> list[tuple[str, str, int]]:
        return sorted(self.seen.values(), key=lambda item: -item[2])[:n]


def census(engine: Any) -> StorageCensus:
    """Sort everything `engine` holds into params / grads / optimizer / buffers (see the module docstring)."""
    found = StorageCensus()
    zero_opt = engine.optimizer
    inner = getattr(zero_opt, "optimizer", zero_opt)  # stage 1-3 wrap a torch optimizer; stage 0 is one
    for attr in ("fp16_partitioned_groups_flat", "fp32_partitioned_groups_flat", "single_partition_of_fp32_groups",
                 "bit16_groups_flat", "parallel_partitioned_bit16_groups"):
        found.walk(getattr(zero_opt, attr, None), "params", f"optimizer.{attr}", 3, set())
    for name, param in engine.module.named_parameters():  # ZeRO-3: ds_tensor views the flat groups above
        found.add(param.data, "params", f"param {name}")
        found.add(getattr(param, "ds_tensor", None), "params", f"param {name}.ds_tensor")
    for group in inner.param_groups:  # the tensors the torch optimizer updates (stage 3: fp32 partitions)
        for i, param in enumerate(group["params"]):
            found.add(param.data, "params", f"inner.param_groups[.][{i}]")
    for name, param in engine.module.named_parameters():
        found.add(param.grad, "grads", f"param {name}.grad")
    for attr in ("grad_partitions_flat_buffer", "averaged_gradients", "single_partition_of_fp32_groups_grad"):
        found.walk(getattr(zero_opt, attr, None), "grads", f"optimizer.{attr}", 3, set())
    for param in (p for g in inner.param_groups for p in g["params"]):
        found.add(param.grad, "grads", "inner param .grad")
    found.walk(inner.state, "optimizer", "inner.state", 3, set())
    found.walk(zero_opt, "buffers", "optimizer", 4, set())
    found.walk(engine, "buffers", "engine", 3, set())
    return found


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One rank of one stage (collective): train, count before the last steps, return this rank's numbers."""
    info = dist.init()
    setup_logging(1)  # warnings only
    tmp = bench_dir("symeq-bench-mem-")
    stage = args.stage
    cfg = load_config(args.config, [f"run_dir={tmp / f'zero{stage}'}", *bench_overrides(args.shards, args.steps),
                                    f"train.batch_size={args.batch}", "data.num_workers=0",
                                    f"engines.encoder.zero_stage={stage}", f"engines.decoder.zero_stage={stage}",
                                    *args.overrides])
    trainer = build_trainer(cfg, info)
    counts: dict[str, dict[str, Any]] = {}

    def counting(name: str, engine: Any) -> Any:
        step = engine.step

        def wrapped(*a: Any, **kw: Any) -> Any:
            if trainer.state.step == args.steps - 1:  # the last iteration: grads present, Adam state exists
                found = census(engine)
                counts[name] = {"bytes": found.totals(), "largest": found.largest(args.largest),
                                "numel": sum(p.numel() for p in engine.module.parameters()),
                                "ds_numel": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())}
            return step(*a, **kw)

        return wrapped

    for name, engine in trainer.engines.items():
        engine.step = counting(name, engine)
    trainer.train(until=args.steps)  # train.steps is one more: no final checkpoint
    trainer.close()
    remove_dir(tmp)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rank": info.rank, "world": info.world_size, "stage": stage, "engines": counts,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "vm_size": int(status.get("VmSize", "0 kB").split()[0]) * 1024,
            "model": cfg.model.kind, "batch": cfg.train.batch_size}


def report(results: list[dict[str, Any]], verbose: bool) -> None:
    first = results[0]
    numel = {name: e["ds_numel"] for name, e in first["engines"].items()}
    print(f"model {first['model']}: " + ", ".join(f"{n} {v / 1e6:.2f}M" for n, v in numel.items())
          + f" parameters (fp32); world {first['world']}, global batch {first['batch']}; MiB per rank")
    print("\n| rank | ZeRO | engine | params | grads | optimizer | model states | other buffers (nominal) |")
    print("|---|---|---|---|---|---|---|---|")
    by_key = {(r["rank"], r["stage"]): r for r in results}
    for (rank, stage), r in sorted(by_key.items()):
        for name, e in r["engines"].items():
            b = e["bytes"]
            states = b["params"] + b["grads"] + b["optimizer"]
            print(f"| {rank} | {stage} | {name} | {b['params'] / MiB:.2f} | {b['grads'] / MiB:.2f} | "
                  f"{b['optimizer'] / MiB:.2f} | {states / MiB:.2f} | {b['buffers'] / MiB:,.1f} |")
    print("\n| rank | ZeRO | model states, both engines | + other buffers (nominal) | peak RSS | virtual size |")
    print("|---|---|---|---|---|---|")
    for (rank, stage), r in sorted(by_key.items()):
        states, allb = _sums(r)
        print(f"| {rank} | {stage} | {states / MiB:.2f} | {allb / MiB:,.1f} | {r['peak_rss'] / MiB:,.0f} | "
              f"{r['vm_size'] / MiB:,.0f} |")
    ranks = sorted({r["rank"] for r in results})
    stages = sorted({r["stage"] for r in results})
    if len(stages) == 2:
        low, high = stages
        print(f"\nratio ZeRO-{high} / ZeRO-{low} per rank:")
        for rank in ranks:
            a, b = by_key[(rank, low)], by_key[(rank, high)]
            (sa, aa), (sb, ab) = _sums(a), _sums(b)
            print(f"  rank {rank}: model states {sb / sa:.3f}, with buffers (nominal) {ab / aa:.1f}, "
                  f"peak RSS {b['peak_rss'] / a['peak_rss']:.3f}")
    if verbose:
        for (rank, stage), r in sorted(by_key.items()):
            for name, e in r["engines"].items():
                print(f"\nrank {rank} ZeRO-{stage} {name}: largest storages")
                for kind, path, size in e["largest"]:
                    print(f"  {size / MiB:10.3f} MiB  {kind:9s} {path}")


def _sums(r: dict[str, Any]) -> tuple[int, int]:
    states = sum(e["bytes"][k] for e in r["engines"].values() for k in ("params", "grads", "optimizer"))
    return states, states + sum(e["bytes"]["buffers"] for e in r["engines"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=LADDER_CONFIG, help="run config (default: the MNIST ladder)")
    parser.add_argument("--overrides", nargs="*", default=[], help="dotted config overrides")
    parser.add_argument("--shards", type=Path, default=SHARDS)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 3], help="ZeRO stages to compare")
    parser.add_argument("--world", type=int, default=2, help="ranks (torchrun processes)")
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--steps", type=int, default=3, help="training steps; counted before the last")
    parser.add_argument("--verbose", action="store_true", help="also list each engine's largest storages")
    parser.add_argument("--largest", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)  # internal: a child's stage
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # internal: a child's output prefix
    args = parser.parse_args()
    ensure_shards(args.shards)
    if args.result is not None:  # a child rank
        out = measure(args)
        Path(f"{args.result}.rank{out['rank']}.json").write_text(json.dumps(out))
        dist.shutdown()
        return
    tmp = bench_dir("symeq-bench-mem-rows-")
    results = []
    for stage in args.stages:
        prefix = tmp / f"zero{stage}"
        launch(Path(__file__), ["--config", str(args.config), "--shards", str(args.shards), "--batch", str(args.batch),
                                "--steps", str(args.steps), "--stage", str(stage), "--result", str(prefix),
                                "--largest", str(args.largest), "--overrides", *args.overrides], world=args.world)
        results += [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in range(args.world)]
    remove_dir(tmp)
    report(results, args.verbose)


if __name__ == "__main__":
    main()
