#!/usr/bin/env bash
# Consistency on one GPU (docs/consistency.md, "Prepared for a GPU"): the reference MNIST ladder HVAE
# (configs/mnist_ladder.yaml: Bernoulli 30/100 bits, batch 1024, Adam lr 1e-4, alternating updates), trained with
# the symmetric game and with the ELBO for as many iterations as fit in TRAIN_SECONDS each (default 200 s), then
# `symeq eval --n 1000 --chain-steps 0,10,100,1000` of both and `symeq compare`. Unattended, under 10 minutes.
#
#   experiments/consistency_gpu.sh              # needs a visible CUDA GPU; writes to $OUT (or runs/consistency_gpu)
#   experiments/consistency_gpu.sh --dry-run    # the same steps on the CPU at toy size (a check of the script)
#
# How the length is chosen: a first segment of CALIBRATION_STEPS (default 100) iterations measures img/s from the
# run's own log line (monitor.log_every), then the same run is resumed (bitwise what one run would do) to the
# number of iterations that fills the rest of TRAIN_SECONDS at that rate. Everything lands under $OUT: report.md
# (numbers, lengths, timings), the eval reports, the comparison table and plots, and every log.
# Environment: PYTHON (default .venv/bin/python), OUT, TRAIN_SECONDS, CALIBRATION_STEPS, EVAL_N.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
DRY_RUN="${DRY_RUN:-0}"
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT="${OUT:-$ROOT/runs/consistency_gpu}"
START=$(date +%s)
REPORT="$OUT/report.md"

say() { echo "[consistency_gpu $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/logs/script.log"; }
symeq() { "$PYTHON" -m symeq_dist.cli "$@"; }

if [ "$DRY_RUN" = 1 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  TRAIN_SECONDS="${TRAIN_SECONDS:-20}" CALIBRATION_STEPS="${CALIBRATION_STEPS:-4}" EVAL_N="${EVAL_N:-40}"
  MIN_STEPS=$(( CALIBRATION_STEPS + 4 ))   # the resume always extends the run, so the dry run checks it too
  CHAINS="0,2,5"
  TOY=(model.num_z0=4 model.num_z1=8 model.trunk_width=32 model.mlp_width=32 train.batch_size=16
       data.num_workers=0 monitor.log_every=2)
  MAX_STEPS=40   # the toy run stops here whatever the measured rate says
else
  TRAIN_SECONDS="${TRAIN_SECONDS:-200}" CALIBRATION_STEPS="${CALIBRATION_STEPS:-100}" EVAL_N="${EVAL_N:-1000}"
  MIN_STEPS=$CALIBRATION_STEPS
  CHAINS="0,10,100,1000"
  TOY=(monitor.log_every=50)
  MAX_STEPS=1000000
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    smi=$(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | head -1 || echo "not installed")
    echo "consistency_gpu.sh: no CUDA GPU is visible to $PYTHON (torch.cuda.is_available() is False;" \
         "nvidia-smi: $smi). This script needs one: run it on a GPU machine with a CUDA build of torch" \
         "(README, GPU install), or check it on the CPU with --dry-run. Nothing was written." >&2
    exit 3
  fi
fi

cd "$ROOT"
mkdir -p "$OUT/logs"
SHARDS="$OUT/shards/mnist"
say "commit $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown); dry-run $DRY_RUN; out $OUT"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>&1 | tee -a "$OUT/logs/script.log"
symeq shards mnist --out "$SHARDS" > "$OUT/logs/data.log" 2>&1
[ -f "$SHARDS/classifier.pt" ] || symeq eval train-features "$SHARDS" $([ "$DRY_RUN" = 1 ] && echo --epochs 1) \
  >> "$OUT/logs/data.log" 2>&1
say "shards and FD-clf network ready"

declare -A STEPS RATE
for game in symmetric elbo; do
  run="$OUT/runs/$game" log="$OUT/logs/train_$game.log"
  rm -rf "$run"
  t0=$(date +%s)
  symeq train configs/mnist_ladder.yaml run_dir="$run" data.shards="$SHARDS" game.kind=$game \
    train.steps="$CALIBRATION_STEPS" checkpoint.every=1000000 checkpoint.keep_last=2 monitor.progress=false \
    monitor.image_every=1000000 "${TOY[@]}" > "$log" 2>&1
  rate=$(grep -o '[0-9.]* img/s' "$log" | tail -1 | cut -d' ' -f1)
  batch=$("$PYTHON" -c "import yaml,sys; print(yaml.safe_load(open('$run/config.yaml'))['train']['batch_size'])")
  used=$(( $(date +%s) - t0 ))
  # iterations for the rest of the budget at the measured rate (startup of the resume counted as 15 s)
  steps=$("$PYTHON" -c "r=float('${rate:-0}') or 1.0; left=max(0, $TRAIN_SECONDS - $used - 15)
print(max($MIN_STEPS, min($MAX_STEPS, $CALIBRATION_STEPS + int(left * r / $batch))))")
  say "$game: $CALIBRATION_STEPS calibration steps in ${used}s (${rate:-?} img/s at batch $batch) -> train.steps=$steps"
  symeq resume "$run" train.steps="$steps" >> "$log" 2>&1
  STEPS[$game]=$steps RATE[$game]=${rate:-?}
  say "$game: trained to $steps steps in $(( $(date +%s) - t0 ))s"
done

for game in symmetric elbo; do
  symeq eval "$OUT/runs/$game" --n "$EVAL_N" --chain-steps "$CHAINS" --tsne-points 500 \
    > "$OUT/logs/eval_$game.log" 2>&1
  cp "$OUT/runs/$game/eval/report.json" "$OUT/eval_$game.json"
  cp "$OUT/runs/$game/eval/report.md" "$OUT/eval_$game.md"
  say "$game: evaluated"
done
symeq compare "$OUT/runs/symmetric" "$OUT/runs/elbo" --out "$OUT/compare" > "$OUT/logs/compare.log" 2>&1

{
  echo "# consistency_gpu.sh"
  echo
  echo "- commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown); date $(date -u +%FT%TZ); dry-run $DRY_RUN"
  echo "- training budget per game: ${TRAIN_SECONDS}s; symmetric ${STEPS[symmetric]} steps (${RATE[symmetric]} img/s)," \
       "ELBO ${STEPS[elbo]} steps (${RATE[elbo]} img/s)"
  echo "- eval: --n $EVAL_N --chain-steps $CHAINS; total wall time $(( $(date +%s) - START ))s"
  echo
  sed -n '/^| metric/,/^$/p' "$OUT/compare.md"
} > "$REPORT"
cat "$REPORT"
say "done: $REPORT"
