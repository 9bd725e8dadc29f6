#!/usr/bin/env bash
# The teaching ablation grid at the demo preset: one DrPose run per row, each reconstructed and
# evaluated against base on the bench. Needs a finished `make demo` (RUN=runs/demo). About 5 CPU
# minutes a row. Usage: bash bench/ablation.sh [SEEDS="0 1"]; rows land in $RUN/ablation.md.
set -euo pipefail
RUN=${RUN:-runs/demo}; PY=${PYTHON:-.venv/bin/python}; SEEDS=${SEEDS:-0}
ROWS=(
  "drtune_K2_kl0.01:--method drtune --grad-steps 2 --kl-weight 0.01"
  "draft_K2:--method draft --grad-steps 2"
  "alignprop:--method alignprop"
  "drtune_K1:--method drtune --grad-steps 1"
  "drtune_kl1:--method drtune --kl-weight 1.0"
  "drtune_lr5e-4_kl1:--method drtune --kl-weight 1.0 --lr 5e-4"
  "keypoints_reward:--reward keypoints"
)
models=()
for seed in $SEEDS; do
  for row in "${ROWS[@]}"; do
    name=${row%%:*}_s$seed; flags=${row#*:}
    [ -f $RUN/ablation/$name/drpose_config.json ] || $PY finetune.py drpose --preset demo --run-dir $RUN --seed $seed \
      --out $RUN/ablation/$name $flags
    [ -f $RUN/recon/$name/manifest.json ] || $PY reconstruct.py --preset demo --run-dir $RUN --model $RUN/ablation/$name --tag $name
    models+=($name)
  done
done
$PY evaluate.py --preset demo --run-dir $RUN --models base "${models[@]}"
cp $RUN/eval/results.md $RUN/ablation.md
echo "wrote $RUN/ablation.md"
