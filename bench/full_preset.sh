#!/usr/bin/env bash
# The `full` preset on one GPU, in two parts that each fit a 10-minute call on a machine that keeps
# runs/ between them. Usage (repo root, GPU machine): OUT=dir bash bench/full_preset.sh a|b
#   a: data (full sizes, rendered on the GPU), g_skel (reward), pose reader, base model (steps sized
#      to the time left)
#   b: DrPose for seeds 0 1 2 (as many as fit), reconstruction of the first COUNT bench subjects
#      with base and each seed, evaluation per seed
set -euo pipefail
RUN=${RUN:-runs/full}; OUT=${OUT:-/tmp/out}; DEADLINE_S=${DEADLINE_S:-560}; COUNT=${COUNT:-20}
DRPOSE_STEPS=${DRPOSE_STEPS:-200}; DRPOSE_BATCH=${DRPOSE_BATCH:-8}
t0=$(date +%s); left() { echo $((DEADLINE_S - ($(date +%s) - t0))); }
nvidia-smi --query-gpu=name --format=csv,noheader || true
if [ "$1" = a ]; then
  [ -f $RUN/data/bench/manifest.json ] || python3 prepare_data.py --preset full --run-dir $RUN --device cuda
  echo "TIME prepare_data $(( $(date +%s) - t0 )) s"
  python3 posescore.py train --preset full --run-dir $RUN --device cuda --steps ${GSKEL_STEPS:-2000}
  echo "TIME posescore $(( $(date +%s) - t0 )) s"
  python3 posescore.py train --preset full --run-dir $RUN --device cuda --steps ${READER_STEPS:-2000} \
    --out $RUN/pose_reader --train-on any --seed 1
  echo "TIME pose reader $(( $(date +%s) - t0 )) s"
  # pretrain: as many steps as the time left allows at the measured 0.28 s/step on an H100
  # (bench/results/full_preset_a.log), keeping 100 s for the evaluation
  STEPS=${PRETRAIN_STEPS:-$(python3 -c "print(max(200, int(($(left) - 100) / 0.30) // 100 * 100))")}
  echo "pretrain steps $STEPS"
  python3 pretrain.py --preset full --run-dir $RUN --device cuda --steps $STEPS --num-eval ${NUM_EVAL:-30} \
    --checkpoint-every 100000 --val-every 500 --log-every 50
  echo "TIME pretrain $(( $(date +%s) - t0 )) s"
  cp $RUN/base/val_metrics.json $OUT/base_val_metrics.json; cp $RUN/base/samples_bench.png $OUT/
  cp $RUN/posescore/validation.json $OUT/posescore_validation.json; cp $RUN/data/drpose/manifest.json $OUT/drpose_manifest.json
  cp $RUN/pose_reader/validation.json $OUT/reader_validation.json
else
  python3 reconstruct.py --preset ${RECON_PRESET:-demo} --run-dir $RUN --model base --count $COUNT --device cuda
  echo "TIME recon base $(( $(date +%s) - t0 )) s"
  for seed in ${SEEDS:-0 1 2}; do
    [ $(left) -lt ${SEED_S:-150} ] && { echo "SKIP seed $seed: $(left) s left"; continue; }
    python3 finetune.py --preset full --run-dir $RUN --device cuda --seed $seed --steps $DRPOSE_STEPS \
      --batch-size $DRPOSE_BATCH --out $RUN/drpose_s$seed --eval-every 100 --num-eval 16
    echo "TIME drpose seed $seed $(( $(date +%s) - t0 )) s"
    python3 reconstruct.py --preset ${RECON_PRESET:-demo} --run-dir $RUN --model $RUN/drpose_s$seed --tag drpose_s$seed --count $COUNT --device cuda
    python3 evaluate.py --preset full --run-dir $RUN --models base drpose_s$seed --device cuda
    cp $RUN/eval/results.json $OUT/results_s$seed.json; cp $RUN/drpose_s$seed/metrics.jsonl $OUT/drpose_metrics_s$seed.jsonl
    echo "TIME seed $seed done $(( $(date +%s) - t0 )) s"
  done
fi
echo "TIME total $(( $(date +%s) - t0 )) s"
