#!/usr/bin/env bash
# Every reward candidate through the hacking gate (bench/reward_probe.py), on the CPU, after `make demo`: the
# g_skels the candidates need (each from the reward's own g_skel, posescore/, never from a reader's), then one gate
# per candidate, JOBS at a time on one thread each, then one table (a row per candidate, each reader and split).
# Usage (repo root): [RUN=runs/demo] [OUT=$RUN/gate] [JOBS=2] [MODELS="DIR ..."] bash bench/reward_candidates.sh
set -uo pipefail
RUN=${RUN:-runs/demo}; OUT=${OUT:-$RUN/gate}; JOBS=${JOBS:-2}
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-.venv/bin/python}
mkdir -p $OUT
# --- the candidates' g_skels: adversarial training (PGD), pose-free images, the generators' mess --------------
gskel() {  # name, flags: fine-tune the reward's g_skel 200-300 steps with them
  [ -f $RUN/$1/posescore_config.json ] || $PY posescore.py train --preset demo --run-dir $RUN --out $RUN/$1 \
    --init $RUN/posescore --lr 1e-3 --log-every 100 "${@:2}" > $OUT/$1.train.log 2>&1
}
gskel posescore_adv --steps 200 --adv-eps 1.0 --adv-steps 3 &
gskel posescore_adv_free --steps 300 --adv-eps 1.0 --adv-steps 3 --pose-free 0.25 --pose-free-kinds gaussian gaussians mean &
wait
gskel posescore_mess_free --steps 300 --mess 1 --pose-free 0.25 --pose-free-kinds gaussian gaussians mean
# --- an ensemble: the reward's g_skel and two more made by the same command with other seeds (posescore_ensemble
# reads the members that ensemble.json in its reward folder lists) ----------------------------------------------
for seed in 1 2; do
  [ -f $RUN/posescore_seed$seed/posescore_config.json ] || $PY posescore.py train --preset demo --run-dir $RUN \
    --out $RUN/posescore_seed$seed --seed $seed > $OUT/posescore_seed$seed.train.log 2>&1 &
done
wait
[ -f $RUN/posescore_ens/ensemble.json ] || { rm -rf $RUN/posescore_ens && cp -r $RUN/posescore $RUN/posescore_ens &&
  echo '{"members": ["../posescore_seed1", "../posescore_seed2"]}' > $RUN/posescore_ens/ensemble.json; }
# --- mined hard negatives, two rounds: mine what the reward's g_skel pays for (bench/mine_negatives.py, DrPose rows
# 96+, never the bench), retrain on it, mine again from the retrained one. MODELS: folders of models that game the
# reward (e.g. DrPose with the paper's recipe at 12,800 samples), whose side views join the first round.
MODELS=${MODELS:-}
mine() {  # name, flags
  [ -f $RUN/negatives/$1.npz ] || $PY bench/mine_negatives.py --run-dir $RUN "${@:2}" --out $RUN/negatives/$1.npz \
    > $OUT/$1.mine.log 2>&1
}
mkdir -p $RUN/negatives
mine round1 --reward-dir $RUN/posescore ${MODELS:+--models $MODELS}
gskel posescore_neg1 --steps 300 --negatives $RUN/negatives/round1.npz
mine round2 --reward-dir $RUN/posescore_neg1 --rows 192 96
gskel posescore_neg2 --steps 300 --negatives $RUN/negatives/round1.npz $RUN/negatives/round2.npz
# --- the gates: name | flags --------------------------------------------------------------------------------
CANDIDATES=(
  "posescore|--reward posescore"
  "posescore_dice|--reward posescore_dice"
  "keypoints|--reward keypoints"
  "posescore_smooth|--reward posescore_smooth"
  "posescore_median|--reward posescore_median"
  "posescore_lowpass|--reward posescore_lowpass"
  "posescore_contrast|--reward posescore_contrast"
  "posescore_realism0.3|--reward posescore --realism-weight 0.3"
  "posescore_dice_realism0.3|--reward posescore_dice --realism-weight 0.3"
  "posescore_adv|--reward posescore --reward-dir $RUN/posescore_adv"
  "posescore_adv_free|--reward posescore --reward-dir $RUN/posescore_adv_free"
  "posescore_mess_free|--reward posescore --reward-dir $RUN/posescore_mess_free"
  "posescore_neg1|--reward posescore --reward-dir $RUN/posescore_neg1"
  "posescore_neg2|--reward posescore --reward-dir $RUN/posescore_neg2"
  "posescore_ensemble|--reward posescore_ensemble --reward-dir $RUN/posescore_ens"
  "posescore_ensemble_realism0.3|--reward posescore_ensemble --reward-dir $RUN/posescore_ens --realism-weight 0.3"
)
running=0
for entry in "${CANDIDATES[@]}"; do
  name=${entry%%|*}; flags=${entry#*|}
  [ -f $OUT/$name.json ] || { $PY bench/reward_probe.py --run-dir $RUN $flags --out $OUT/$name.json > $OUT/$name.log 2>&1 \
    || echo "gate $name failed: $OUT/$name.log"; } &
  running=$((running + 1)); if [ $running -ge $JOBS ]; then wait -n; running=$((running - 1)); fi
done
wait
$PY bench/reward_probe.py --table $(for entry in "${CANDIDATES[@]}"; do echo $OUT/${entry%%|*}.json; done) \
  | tee $OUT/candidates.md
