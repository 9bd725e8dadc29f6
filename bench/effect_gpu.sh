#!/usr/bin/env bash
# DrPose's effect on one GPU at a stated sample budget, over seeds: the supervised ceiling and DrPose
# variants (the paper's recipe, a gated reward, regularisers), every model read by the judge's two readers
# (bench/yardstick.py) on held-out scans, the DrPose poses and both bench splits. Runs train in parallel
# processes (the demo network leaves the GPU idle). No run's stopping point is chosen: each ends at its budget.
# The kept reward is the best by the hacking gate (docs/results.md, The hacking gate): no candidate passes it yet,
# and the best is posescore_ensemble (the reward's g_skel and two more of other seeds, mean - std) with DrPose's
# realism term at 0.3, so KEPT carries both and the row "kept + realism 0.3" is the row "kept".
# Usage (GPU machine, repo root): OUT=dir [SEEDS="0 1"] [ROWS="paper kept kept+anchor0.5"]
#   [STEPS=800 BATCH=16] [KEPT="--reward NAME"] [KEPT_GSKEL="posescore.py train flags for its g_skel"]
#   [CEILING="--lr 5e-4 ..."] [DRPOSE_FLAGS="--lr 5e-4"] [MINUTES=8] bash bench/effect_gpu.sh
# STEPS x BATCH is the sample budget of every DrPose run and of the ceiling. Each training job stops with a
# checkpoint after MINUTES (--max-minutes); run the same command again and every job resumes (--resume) where
# it stopped, so a budget longer than one call is a chain of calls. Every log lands in $OUT, also when a run or
# the reading fails; the table is written once every run has reached its budget.
set -uo pipefail
RUN=${RUN:-runs/effect}; SEEDS=${SEEDS:-0 1}; ROWS=${ROWS:-paper kept kept+anchor0.5}
OUT=${OUT:-$RUN/out}; STEPS=${STEPS:-800}; BATCH=${BATCH:-16}; MINUTES=${MINUTES:-8}
CEILING=${CEILING:---lr 5e-4 --replay-data $RUN/data/scans/train.npz --replay-share 0.5 --ema-decay 0.995}
KEPT=${KEPT:---reward posescore_ensemble --reward-dir $RUN/posescore_ens --realism-weight 0.3}; KEPT_GSKEL=${KEPT_GSKEL:-}
BUDGET="--steps $STEPS --batch-size $BATCH"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p $(dirname $RUN) $OUT/logs
flags() { local f=""; for part in ${1//+/ }; do case $part in
  paper) ;; kept) f="$f $KEPT${KEPT_GSKEL:+ --reward-dir $RUN/reward_kept}";;
  realism*) f="$f --realism-weight ${part#realism}";; anchor*) f="$f --anchor-weight ${part#anchor}";;
  kl*) f="$f --kl-weight ${part#kl}";; lr*) f="$f --lr ${part#lr}";; esac; done; echo "$f"; }
resume() { ls -d $1_ckpt/step_* >/dev/null 2>&1 && echo --resume; }  # a run that has a checkpoint continues
t0=$(date +%s); tick() { echo "TIME $1 $(( $(date +%s) - t0 )) s"; }
nvidia-smi --query-gpu=name --format=csv,noheader || true
# --- the world: data, the paper's reward g_skel, the kept reward's g_skel, the committed base and readers ---
[ -f $RUN/data/bench/manifest.json ] || OMP_NUM_THREADS=16 python3 prepare_data.py --preset demo --run-dir $RUN \
  --device cpu > $OUT/logs/data.log 2>&1 || { tail -5 $OUT/logs/data.log; exit 1; }
[ -f $RUN/posescore/posescore_config.json ] || python3 posescore.py train --preset demo --run-dir $RUN --device cuda \
  --threads 0 > $OUT/logs/reward.log 2>&1 &
for seed in 1 2; do  # the ensemble's other members: the reward's command with other seeds
  [ -f $RUN/posescore_seed$seed/posescore_config.json ] || python3 posescore.py train --preset demo --run-dir $RUN \
    --out $RUN/posescore_seed$seed --seed $seed --device cuda --threads 0 > $OUT/logs/reward_seed$seed.log 2>&1 &
done
[ -z "$KEPT_GSKEL" ] || [ -f $RUN/reward_kept/posescore_config.json ] || python3 posescore.py train --preset demo \
  --run-dir $RUN --out $RUN/reward_kept --device cuda --threads 0 $KEPT_GSKEL > $OUT/logs/reward_kept.log 2>&1 &
[ -f $RUN/base/model_config.json ] || python3 pretrain.py --preset demo --run-dir $RUN --init pretrained/demo_base \
  --steps 0 --num-eval 0 --device cuda > $OUT/logs/base.log 2>&1
for n in "" 2; do
  [ -f $RUN/pose_reader$n/posescore_config.json ] || python3 posescore.py train --preset demo --run-dir $RUN \
    --out $RUN/pose_reader$n --init pretrained/demo_reader$n --steps 0 --device cuda > $OUT/logs/reader$n.log 2>&1
done
wait; tick "data, reward g_skels, base, readers"
[ -f $RUN/posescore_ens/ensemble.json ] || { rm -rf $RUN/posescore_ens && cp -r $RUN/posescore $RUN/posescore_ens &&
  echo '{"members": ["../posescore_seed1", "../posescore_seed2"]}' > $RUN/posescore_ens/ensemble.json; }
# --- the runs: each trains to its budget, a chain of calls of MINUTES each ---
models=(); pids=()
for seed in $SEEDS; do
  [ -f $RUN/ceiling_s$seed/model_config.json ] || { python3 pretrain.py --preset demo --run-dir $RUN --init $RUN/base \
    --out $RUN/ceiling_s$seed --train-data $RUN/data/drpose_gt/train.npz $BUDGET --warmup-steps $(( STEPS / 10 )) \
    --num-eval 0 --checkpoint-every 50 --seed $seed --device cuda --max-minutes $MINUTES $(resume $RUN/ceiling_s$seed) $CEILING \
    >> $OUT/logs/ceiling_s$seed.log 2>&1 & pids+=($!); }
  models+=(ceiling_s$seed)
  for row in $ROWS; do
    tag=${row//+/_}_s$seed
    [ -f $RUN/$tag/model_config.json ] || { python3 finetune.py --preset demo --run-dir $RUN --seed $seed --out $RUN/$tag \
      --device cuda $BUDGET --checkpoint-every 50 --eval-every 100000 --max-minutes $MINUTES $(resume $RUN/$tag) ${DRPOSE_FLAGS:-} \
      $(flags $row) >> $OUT/logs/$tag.log 2>&1 & pids+=($!); }
    models+=($tag)
  done
done
for pid in "${pids[@]}"; do wait $pid || echo "a run exited with status $? (its log is in $OUT/logs)"; done
tick "runs: ${models[*]}"
done_models=(); for m in "${models[@]}"; do [ -f $RUN/$m/model_config.json ] && done_models+=($m); done
cp $RUN/*/metrics.jsonl $OUT/logs/ 2>/dev/null; for m in "${models[@]}"; do cp $RUN/$m/metrics.jsonl $OUT/logs/$m.metrics.jsonl 2>/dev/null; done
if [ ${#done_models[@]} -eq ${#models[@]} ]; then
  python3 bench/yardstick.py --run-dir $RUN --models base "${models[@]}" --count 48 --device cuda \
    --out $OUT/effect.json > $OUT/logs/yardstick.log 2>&1 || echo "the reading failed: $OUT/logs/yardstick.log"
  tail -6 $OUT/logs/yardstick.log
else
  echo "not every run has reached its budget (${#done_models[@]} of ${#models[@]}): run the same command again"
fi
tick total
tar czf $OUT/effect_logs.tgz -C $OUT logs
