#!/usr/bin/env bash
# One unattended GPU check (issue 12), under 10 minutes on one GPU. Writes its report to $OUT (default
# ./gpu_check_out): NCCL at world size 1, both players in bf16 at ZeRO-2 and ZeRO-3, and the 256x256 config for a
# few hundred steps with images/s, peak memory and an MFU estimate. Needs CUDA; fails fast without it.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh            # or: DRY_RUN=1 (CPU, tiny sizes: checks the script only)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
echo "gpu_check: $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -z "${DRY_RUN:-}" ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible (torch.cuda.is_available() is False); run it on a GPU machine, or DRY_RUN=1 to check the script on CPU')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia_smi.csv"
  unset DS_ACCELERATOR
fi
timeout "${LIMIT_S:-540}" "$PY" benchmarks/gpu_check.py --out "$OUT" ${DRY_RUN:+--dry-run}
echo "gpu_check: report in $OUT/report.md"
