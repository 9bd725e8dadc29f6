#!/usr/bin/env bash
# The effect at the demo preset, on one GPU, over seeds: base, the supervised ceiling, DrPose as the
# paper has it and DrPose with the realism penalty, each read by the pose reader per bench split.
# The same commands as `make demo` and bench/ablation.sh, with --device cuda and the DrPose runs in
# parallel (the demo network leaves the GPU idle; each run is bound by its own Python and launches).
# 3D fits are skipped (--fit-every 1000: subject 0 only): the judge is the view joint error.
# Usage (GPU machine, repo root): OUT=dir [SEEDS="0 1 2"] [ROWS="paper realism0.3"] [STEPS=100 BATCH=4]
#   [CEILING_LR=5e-4] [DRPOSE_FLAGS="--lr 5e-4"] bash bench/effect_gpu.sh
# STEPS x BATCH is the sample budget of every DrPose run and of the ceiling (demo preset: 100 x 4).
set -euo pipefail
RUN=${RUN:-runs/effect}; SEEDS=${SEEDS:-0 1 2}; ROWS=${ROWS:-paper realism0.3}; OUT=${OUT:-$RUN/out}
STEPS=${STEPS:-100}; BATCH=${BATCH:-4}; CEILING_LR=${CEILING_LR:-5e-4}
BUDGET="--steps $STEPS --batch-size $BATCH"
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
flags() { case $1 in paper) echo "";; realism*) echo "--realism-weight ${1#realism}";; kl*) echo "--kl-weight ${1#kl}";; esac; }
t0=$(date +%s); tick() { echo "TIME $1 $(( $(date +%s) - t0 )) s"; }
nvidia-smi --query-gpu=name --format=csv,noheader || true
mkdir -p $(dirname $RUN) $OUT
[ -f $RUN/data/bench/manifest.json ] || python3 prepare_data.py --preset demo --run-dir $RUN --device cpu > $RUN.data.log 2>&1 \
  || { tail -5 $RUN.data.log; exit 1; }
grep -a "drpose:\|bench:" $RUN.data.log || true; tick data
python3 posescore.py train --preset demo --run-dir $RUN --device cuda --threads 0 2>&1 | grep -av "it/s" | tail -3 &
python3 pretrain.py --preset demo --run-dir $RUN --init pretrained/demo_base --steps 0 --device cuda 2>&1 | tail -3
python3 posescore.py train --preset demo --run-dir $RUN --out $RUN/pose_reader --train-on any --seed 1 \
  --init pretrained/demo_reader --steps 0 --device cuda 2>&1 | grep -av "it/s" | tail -2
python3 pretrain.py --preset demo --run-dir $RUN --init $RUN/base --out $RUN/ceiling --train-data $RUN/data/drpose_gt/train.npz \
  $BUDGET --lr $CEILING_LR --warmup-steps 10 --num-eval 0 --checkpoint-every 100000 --device cuda 2>&1 | tail -1
wait; tick "reward g_skel, base, reader, ceiling"
models=()
for row in $ROWS; do for seed in $SEEDS; do
  python3 finetune.py --preset demo --run-dir $RUN --seed $seed --out $RUN/ablation/${row}_s$seed --device cuda \
    $BUDGET --checkpoint-every 100000 --eval-every 100000 ${DRPOSE_FLAGS:-} $(flags $row) > $RUN/${row}_s$seed.log 2>&1 &
  models+=(${row}_s$seed)
done; done
wait; tick "DrPose runs: ${models[*]}"
python3 reconstruct.py --preset demo --run-dir $RUN --model base --fit-every 1000 --device cuda > /dev/null 2>&1 &
python3 reconstruct.py --preset demo --run-dir $RUN --model ceiling --fit-every 1000 --device cuda > /dev/null 2>&1 &
for m in "${models[@]}"; do
  python3 reconstruct.py --preset demo --run-dir $RUN --model $RUN/ablation/$m --tag $m --fit-every 1000 --device cuda > /dev/null 2>&1 &
done
wait; tick reconstruct
python3 evaluate.py --preset demo --run-dir $RUN --models base ceiling "${models[@]}" --max-grids 0 --device cuda 2>&1 | tail -40
python3 bench/ablation_table.py $RUN/eval/results.json | tee $OUT/effect_table.md
tick total
cp $RUN/eval/results.json $OUT/effect_results.json
tar czf $OUT/effect_logs.tgz $RUN/*.log $RUN/ablation/*/metrics.jsonl $RUN/posescore/validation.json $RUN/ceiling/metrics.jsonl 2>/dev/null || true
