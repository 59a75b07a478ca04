#!/usr/bin/env bash
# docs/evaluation.md, "Symmetric vs ELBO at 3,000 steps": configs/demo_mnist_mlp.yaml trained 3,000 steps with
# game.kind=symmetric and elbo for several seeds at one commit, each evaluated with
# `symeq eval RUN --n N --chain-steps 1000`; prints one table row per run. Each run ~4-7 min of training and
# ~3-8 min of evaluation on one core of the 2-core CPU machine (about 2 h for the default 3 seeds x 2 games x n 2000).
#
#   experiments/seed_spread.sh                      # this checkout, seeds 0 1 2, n 2000, into runs/seed_spread
#   COMMIT=3630747 SEEDS="0 1" NS="1000 2000" OUT=/tmp/spread experiments/seed_spread.sh   # another commit
#
# COMMIT is checked out as a git worktree under OUT and run with this checkout's .venv (torch/deepspeed).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(mkdir -p "${OUT:-$ROOT/runs/seed_spread}" && cd "${OUT:-$ROOT/runs/seed_spread}" && pwd)"
PY="$ROOT/.venv/bin/python"
if [ -n "${COMMIT:-}" ]; then
  SRC="$OUT/src_$COMMIT"
  [ -d "$SRC" ] || git -C "$ROOT" worktree add --detach "$SRC" "$COMMIT" >/dev/null
else
  SRC="$ROOT"
fi
export OMP_NUM_THREADS=1 PYTHONPATH="$SRC" DS_ACCELERATOR=cpu
symeq() { "$PY" -m symeq_dist.cli "$@"; }
cd "$OUT"
echo "commit $(git -C "$SRC" rev-parse --short HEAD) $(date -u +%FT%TZ)" | tee -a timings.log
[ -f shards/mnist/manifest.json ] || symeq shards mnist --out shards/mnist > shards.log 2>&1
[ -f shards/mnist/classifier.pt ] || symeq eval train-features shards/mnist > features.log 2>&1
for seed in ${SEEDS:-0 1 2}; do
  for kind in symmetric elbo; do
    run="${kind}_s$seed"
    if [ ! -f "$run/checkpoints/latest" ]; then
      t0=$(date +%s)
      symeq train "$SRC/configs/demo_mnist_mlp.yaml" run_dir="$OUT/$run" data.shards="$OUT/shards/mnist" \
        train.steps=3000 game.kind=$kind seed=$seed engines.ds_config="$SRC/ds_config.json" \
        monitor.progress=false > "train_$run.log" 2>&1
      echo "train $run $(( $(date +%s) - t0 )) s" >> timings.log
    fi
    for n in ${NS:-2000}; do
      if [ ! -f "report_${run}_n$n.json" ]; then
        t0=$(date +%s)
        symeq eval "$run" --n "$n" --chain-steps 1000 > "eval_${run}_n$n.log" 2>&1
        cp "$run/eval/report.json" "report_${run}_n$n.json"
        echo "eval $run n=$n $(( $(date +%s) - t0 )) s" >> timings.log
      fi
    done
  done
done
"$PY" - "$OUT" <<'PY'
import json, pathlib, sys
print("| run | n | random code | limiting chain | ratio |\n|---|---|---|---|---|")
for path in sorted(pathlib.Path(sys.argv[1]).glob("report_*.json")):
    r = json.loads(path.read_text())
    fd = next(iter(r["fd"].values()))
    print(f"| {path.stem[7:]} | {r['n']} | {fd['random_code']:.1f} | {fd['limiting_chain']:.1f} | "
          f"{fd['limiting_chain'] / fd['random_code']:.2f} |")
PY
