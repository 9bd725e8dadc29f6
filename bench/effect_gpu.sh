#!/usr/bin/env bash
# DrPose's effect on one GPU at a stated sample budget, over seeds: the supervised ceiling and DrPose
# variants (the paper's recipe and regularisers), every model read by the judge (bench/yardstick.py) on
# held-out scans, the DrPose poses and both bench splits. Runs train in parallel processes (the demo
# network leaves the GPU idle). No run's stopping point is chosen: each ends at its budget.
# Usage (GPU machine, repo root): OUT=dir [SEEDS="0 1 2"] [ROWS="paper realism0.3 anchor0.5"] [STEPS=400 BATCH=16]
#   [CEILING="--lr 5e-4 ..."] [DRPOSE_FLAGS="--lr 5e-4"] bash bench/effect_gpu.sh
# STEPS x BATCH is the sample budget of every DrPose run and of the ceiling.
set -euo pipefail
RUN=${RUN:-runs/effect}; SEEDS=${SEEDS:-0 1 2}; ROWS=${ROWS:-paper realism0.3 anchor0.5}; OUT=${OUT:-$RUN/out}
STEPS=${STEPS:-400}; BATCH=${BATCH:-16}; CEILING=${CEILING:---lr 5e-4}
BUDGET="--steps $STEPS --batch-size $BATCH"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
flags() { local f=""; for part in ${1//+/ }; do case $part in
  paper) ;; realism*) f="$f --realism-weight ${part#realism}";; anchor*) f="$f --anchor-weight ${part#anchor}";;
  kl*) f="$f --kl-weight ${part#kl}";; lr*) f="$f --lr ${part#lr}";; esac; done; echo "$f"; }
t0=$(date +%s); tick() { echo "TIME $1 $(( $(date +%s) - t0 )) s"; }
nvidia-smi --query-gpu=name --format=csv,noheader || true
mkdir -p $(dirname $RUN) $OUT
[ -f $RUN/data/bench/manifest.json ] || OMP_NUM_THREADS=16 python3 prepare_data.py --preset demo --run-dir $RUN --device cpu \
  > $RUN.data.log 2>&1 || { tail -5 $RUN.data.log; exit 1; }
python3 posescore.py train --preset demo --run-dir $RUN --device cuda --threads 0 > $RUN.reward.log 2>&1 &
python3 pretrain.py --preset demo --run-dir $RUN --init pretrained/demo_base --steps 0 --num-eval 0 --device cuda > $RUN.base.log 2>&1
python3 posescore.py train --preset demo --run-dir $RUN --out $RUN/pose_reader --train-on any --seed 1 \
  --init pretrained/demo_reader --steps 0 --device cuda > $RUN.reader.log 2>&1
wait; tick "data, reward g_skel, base, reader"
models=()
for seed in $SEEDS; do
  python3 pretrain.py --preset demo --run-dir $RUN --init $RUN/base --out $RUN/ceiling_s$seed --train-data \
    $RUN/data/drpose_gt/train.npz $BUDGET --warmup-steps $(( STEPS / 10 )) --num-eval 0 --checkpoint-every 100000 \
    --seed $seed --device cuda $CEILING > $RUN/ceiling_s$seed.log 2>&1 &
  models+=(ceiling_s$seed)
  for row in $ROWS; do
    python3 finetune.py --preset demo --run-dir $RUN --seed $seed --out $RUN/${row}_s$seed --device cuda $BUDGET \
      --checkpoint-every 100000 --eval-every 100000 ${DRPOSE_FLAGS:-} $(flags $row) > $RUN/${row}_s$seed.log 2>&1 &
    models+=(${row}_s$seed)
  done
done
wait; tick "ceilings and DrPose runs: ${models[*]}"
python3 bench/yardstick.py --run-dir $RUN --models base "${models[@]}" --count 48 --device cuda --out $OUT/effect.json
tick total
tar czf $OUT/effect_logs.tgz $RUN/*.log $RUN/*/metrics.jsonl 2>/dev/null || true
