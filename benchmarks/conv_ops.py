"""Per-op evidence for the reference ladder's convolutions on this CPU: which oneDNN kernel runs each layer
(does bf16 reach AMX?), and its forward time in fp32 / bf16, NCHW / channels-last, and for the decoder's
transposed convolutions with the bias inside the op (torch's nn.ConvTranspose2d) or added after it
(`symeq_dist.models.layers.ConvTranspose2d`).

    .venv/bin/python benchmarks/conv_ops.py [--batch 256] [--threads 0]

Prints the CPU's AMX/AVX-512-bf16 flags, oneDNN's ISA line, then one row per layer and variant: the kernel
oneDNN reports (ONEDNN_VERBOSE, read from a child process) and the median forward ms over 7 calls.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

# (kind, in, out, kernel, stride, input side): the ladder's trunk (conv) and image net (transposed conv), METHOD §10
LAYERS = [("conv", 1, 32, 3, 1, 28), ("conv", 32, 32, 2, 1, 28), ("conv", 32, 64, 3, 2, 27), ("conv", 64, 64, 3, 1, 13),
          ("conv", 64, 64, 3, 1, 11), ("conv", 64, 128, 3, 2, 9), ("conv", 128, 600, 4, 1, 4),
          ("deconv", 100, 128, 4, 1, 1), ("deconv", 128, 64, 3, 2, 4), ("deconv", 64, 64, 3, 1, 9),
          ("deconv", 64, 64, 3, 1, 11), ("deconv", 64, 32, 3, 2, 13), ("deconv", 32, 32, 2, 1, 27),
          ("conv", 32, 1, 3, 1, 28)]
VARIANTS = [(dtype, layout, bias) for dtype in ("fp32", "bf16") for layout in ("nchw", "nhwc")
            for bias in ("inside", "after")]


def one_op(kind: str, cin: int, cout: int, k: int, stride: int, side: int, dtype: str, layout: str, bias: str,
           batch: int) -> float:
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    shape = (cout, cin, k, k) if kind == "conv" else (cin, cout, k, k)
    w = torch.randn(shape, dtype=dt).contiguous(memory_format=fmt)
    b = torch.randn(cout, dtype=dt)
    x = torch.randn(batch, cin, side, side, dtype=dt).contiguous(memory_format=fmt)
    pad = 1 if kind == "conv" and k == 3 and stride == 1 else 0
    op = F.conv2d if kind == "conv" else F.conv_transpose2d

    def run() -> torch.Tensor:
        if bias == "inside":
            return op(x, w, b, stride, pad)
        return op(x, w, None, stride, pad) + b.view(1, -1, 1, 1)

    times = []
    with torch.no_grad():
        run()
        for _ in range(7):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def child(batch: int) -> None:
    """Run every (layer, variant) once with ONEDNN_VERBOSE on; print a marker line before each."""
    for layer in LAYERS:
        for variant in VARIANTS:
            if layer[0] == "conv" and variant[2] == "after":
                continue
            print(f"@@{json.dumps([*layer, *variant])}", flush=True)
            one_op(*layer, *variant, batch=batch)


def kernels(threads: int, batch: int) -> tuple[str, dict[str, str]]:
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "OMP_NUM_THREADS": str(threads or os.cpu_count())}
    out = subprocess.run([sys.executable, __file__, "--child", "--batch", str(batch)], capture_output=True,
                         text=True, env=env, check=True).stdout
    isa, found, key = "", {}, None
    for line in out.splitlines():
        if line.startswith("@@"):
            key = line[2:]
        elif ",info,cpu,isa:" in line:
            isa = line.split("isa:", 1)[1]
        elif ",exec,cpu," in line and re.search(r",(de)?convolution,", line) and key:
            found.setdefault(key, line.split(",")[6])  # the implementation name, e.g. brgconv:avx512_core_bf16
    return isa, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.batch)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}; CPU flags: "
          f"amx_tile={'amx_tile' in flags} amx_bf16={'amx_bf16' in flags} avx512_bf16={'avx512_bf16' in flags}")
    isa, found = kernels(args.threads, args.batch)
    print(f"oneDNN ISA: {isa}")
    print(f"{'layer':28s} {'dtype':5s} {'layout':6s} {'bias':6s} {'ms':>7s}  oneDNN kernel")
    for layer in LAYERS:
        kind, cin, cout, k, stride, side = layer
        for variant in VARIANTS:
            if kind == "conv" and variant[2] == "after":
                continue
            ms = one_op(*layer, *variant, batch=args.batch)
            name = f"{kind} {cin}->{cout} k{k} s{stride} @{side}"
            print(f"{name:28s} {variant[0]:5s} {variant[1]:6s} {variant[2]:6s} {ms:7.2f}  "
                  f"{found.get(json.dumps([*layer, *variant]), '?')}", flush=True)


if __name__ == "__main__":
    main()
