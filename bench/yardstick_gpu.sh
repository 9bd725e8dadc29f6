#!/usr/bin/env bash
# The yardstick on one GPU: a pose reader trained under solid mess, the judge's known answers for it and
# for the reader before it, and the supervised ceiling's learning curves (recipes x sample budgets),
# every model read on held-out scans, the DrPose poses and both bench splits (bench/yardstick.py).
# Usage (GPU machine, repo root): OUT=dir [SEEDS="0"] [RECIPES="plain replay_ema"] [BUDGETS="400 1600 6400 25600"]
#   [READER_STEPS=3000] [READER=path: skip training, use this reader] bash bench/yardstick_gpu.sh
# Ceilings train in parallel processes (the demo network leaves the GPU idle; each run is bound by its
# own Python), at batch 16: budget / 16 steps, warm-up a tenth of them.
set -euo pipefail
RUN=${RUN:-runs/yardstick}; OUT=${OUT:-$RUN/out}; SEEDS=${SEEDS:-0}; RECIPES=${RECIPES:-plain replay_ema}
BUDGETS=${BUDGETS:-400 1600 6400 25600}; READER_STEPS=${READER_STEPS:-3000}; BATCH=16
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
recipe() { case $1 in
  plain) echo "--lr 5e-4";;
  replay_ema) echo "--lr 5e-4 --replay-data $RUN/data/scans/train.npz --replay-share 0.5 --ema-decay 0.995";;
  replay) echo "--lr 5e-4 --replay-data $RUN/data/scans/train.npz --replay-share 0.5";;
  low_replay_ema) echo "--lr 2e-4 --replay-data $RUN/data/scans/train.npz --replay-share 0.5 --ema-decay 0.995";;
  bench_oracle) echo "--lr 5e-4";;  # trained on the bench poses' own GT: how much error is ambiguity
esac; }
t0=$(date +%s); tick() { echo "TIME $1 $(( $(date +%s) - t0 )) s"; }
nvidia-smi --query-gpu=name --format=csv,noheader || true
mkdir -p $(dirname $RUN) $OUT
[ -f $RUN/data/bench/manifest.json ] || OMP_NUM_THREADS=16 python3 prepare_data.py --preset demo --run-dir $RUN --device cpu \
  > $RUN.data.log 2>&1 || { tail -5 $RUN.data.log; exit 1; }
python3 pretrain.py --preset demo --run-dir $RUN --init pretrained/demo_base --steps 0 --num-eval 0 --device cuda > $RUN.base.log 2>&1
tick "data and base"
if [ -z "${READER:-}" ]; then
  OMP_NUM_THREADS=4 python3 posescore.py train --preset demo --run-dir $RUN --out $RUN/pose_reader --train-on any --seed 1 \
    --init pretrained/demo_reader --num-broad 4000 --steps $READER_STEPS --batch-size 64 --lr 1e-3 --mess 1 --threads 0 \
    --log-every 500 --device cuda > $RUN.reader.log 2>&1 &
fi
models=()
for seed in $SEEDS; do for r in $RECIPES; do for b in $BUDGETS; do
  data=$RUN/data/drpose_gt/train.npz; [ $r = bench_oracle ] && data=$RUN/data/bench/bench.npz
  steps=$(( b / BATCH )); warm=$(( steps / 10 > 0 ? steps / 10 : 1 )); name=ceil_${r}_${b}_s$seed
  python3 pretrain.py --preset demo --run-dir $RUN --init $RUN/base --out $RUN/$name --train-data $data --steps $steps \
    --batch-size $BATCH --warmup-steps $warm --num-eval 0 --checkpoint-every 100000 --seed $seed --device cuda \
    $(recipe $r) > $RUN/$name.log 2>&1 &
  models+=($name)
done; done; done
wait; tick "reader and ${#models[@]} ceilings"
[ -z "${READER:-}" ] && grep -a "PSNR\|joint err\|trained in" $RUN.reader.log | tail -4 && cp $RUN.reader.log $OUT/reader.log
READER=${READER:-$RUN/pose_reader}
python3 bench/judge_check.py --run-dir $RUN --readers $READER pretrained/demo_reader2 --out $OUT/judge_check.json --device cuda | tail -24
tick "judge checks"
python3 bench/yardstick.py --run-dir $RUN --readers $READER pretrained/demo_reader2 --models base "${models[@]}" --count 48 --device cuda \
  --out $OUT/yardstick.json
tick "yardstick"
