#!/usr/bin/env bash
# The teaching ablation grid at the demo preset: one DrPose run per row and seed, each reconstructed
# and evaluated against base on the bench, then one table (mean ± std over seeds of the bench means).
# Needs a finished `make demo` (RUN=runs/demo: base, ceiling and their reconstructions). About 4 CPU minutes a run; JOBS=2 runs two at once
# with one thread each (two 2-thread jobs on 2 cores thrash: measured 4x slower per step).
# Usage: [JOBS=2] [SEEDS="0"] [ONLY="drtune draft"] bash bench/ablation.sh; writes $RUN/ablation.md.
# Each row is name:seeds:flags; SEEDS, when set, replaces every row's seeds.
set -euo pipefail
RUN=${RUN:-runs/demo}; PY=${PYTHON:-.venv/bin/python}; JOBS=${JOBS:-1}; ONLY=${ONLY:-}
ROWS=(
  "drtune:0 1 2:--method drtune --grad-steps 2 --kl-weight 0.01"
  "draft:0:--method draft --grad-steps 2"
  "alignprop:0:--method alignprop"
  "drtune_K1:0:--method drtune --grad-steps 1"
  "drtune_m0:0:--method drtune --early-stop-max 0"
  "drtune_kl1:0:--method drtune --kl-weight 1.0"
  "drtune_kl10:0:--method drtune --kl-weight 10.0"
  "drtune_lr5e-4:0:--method drtune --lr 5e-4"
  "keypoints:0 1 2:--reward keypoints"
  "posescore_dice:0:--reward posescore_dice"
  "realism0.1:0 1 2:--realism-weight 0.1"
  "realism0.3:0 1 2:--realism-weight 0.3"
)
[ "$JOBS" -gt 1 ] && export OMP_NUM_THREADS=1
one() {  # name seed flags...: fine-tune, then reconstruct with the pose reader (both resume if done)
  local name=$1 seed=$2; shift 2
  [ -f $RUN/ablation/${name}_s$seed/model_config.json ] || $PY finetune.py --preset demo --run-dir $RUN \
    --seed $seed --out $RUN/ablation/${name}_s$seed "$@" > $RUN/ablation/${name}_s$seed.log 2>&1
  [ -f $RUN/recon/${name}_s$seed/manifest.json ] && grep -q '"complete": true' $RUN/recon/${name}_s$seed/manifest.json || \
    $PY reconstruct.py --preset demo --run-dir $RUN --model $RUN/ablation/${name}_s$seed --tag ${name}_s$seed \
    >> $RUN/ablation/${name}_s$seed.log 2>&1
  echo "done ${name}_s$seed"
}
mkdir -p $RUN/ablation
models=()
for row in "${ROWS[@]}"; do
  IFS=: read -r name seeds flags <<< "$row"
  [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]] && continue
  for seed in ${SEEDS:-$seeds}; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
    one $name $seed $flags &  # word-split flags on purpose
    models+=(${name}_s$seed)
  done
done
wait
$PY evaluate.py --preset demo --run-dir $RUN --models base ceiling "${models[@]}" --max-grids 0
$PY bench/ablation_table.py $RUN/eval/results.json > $RUN/ablation.md
cat $RUN/ablation.md
