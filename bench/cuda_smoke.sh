#!/usr/bin/env bash
# Every flag of finetune.py and pretrain.py that changes the CUDA path, 2 steps each, on one GPU: a crash there is
# invisible to CI, which has no GPU. Prints one PASS / FAIL line per case and exits 1 if any fails.
# Usage (GPU machine, repo root): OUT=dir [RUN=runs/smoke] bash bench/cuda_smoke.sh
set -uo pipefail
RUN=${RUN:-runs/smoke}; OUT=${OUT:-$RUN/out}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
mkdir -p $(dirname $RUN) $OUT/logs
t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__)"
# The world: demo data, a quickly trained reward g_skel, the committed base.
[ -f $RUN/data/bench/manifest.json ] || OMP_NUM_THREADS=16 python3 prepare_data.py --preset demo --run-dir $RUN \
  --device cpu > $OUT/logs/data.log 2>&1 || { tail -5 $OUT/logs/data.log; exit 1; }
python3 posescore.py train --preset demo --run-dir $RUN --steps 50 --threads 0 --device cuda > $OUT/logs/reward.log 2>&1 &
python3 pretrain.py --preset demo --run-dir $RUN --init pretrained/demo_base --steps 0 --num-eval 0 --device cuda \
  > $OUT/logs/base.log 2>&1
wait
echo "world ready in $(( $(date +%s) - t0 )) s"

SHORT="--steps 2 --batch-size 4 --num-eval 2 --checkpoint-every 1000 --log-every 1 --device cuda"
FT="python3 finetune.py --preset demo --run-dir $RUN $SHORT --eval-every 1000"
PT="python3 pretrain.py --preset demo --run-dir $RUN --init $RUN/base --train-data $RUN/data/drpose_gt/train.npz \
  --warmup-steps 1 --val-every 1000 $SHORT"
declare -A CASES=(
  [drtune_lora]="$FT --out $RUN/c_drtune_lora"
  [draft]="$FT --method draft --out $RUN/c_draft"
  [alignprop]="$FT --method alignprop --out $RUN/c_alignprop"
  [full_finetune]="$FT --lora-rank 0 --out $RUN/c_full"
  [realism]="$FT --realism-weight 0.3 --out $RUN/c_realism"
  [realism_full]="$FT --realism-weight 0.3 --lora-rank 0 --out $RUN/c_realism_full"
  [anchor]="$FT --anchor-weight 0.5 --out $RUN/c_anchor"
  [no_graphs]="$FT --no-cuda-graphs --out $RUN/c_no_graphs"
  [grad_checkpointing]="$FT --grad-checkpointing True --out $RUN/c_ckpt"
  [resume]="$FT --checkpoint-every 1 --out $RUN/c_resume && $FT --steps 4 --checkpoint-every 1 --resume --out $RUN/c_resume"
  [max_minutes]="$FT --steps 200 --checkpoint-every 1 --max-minutes 0.05 --out $RUN/c_minutes && $FT --steps 200 --checkpoint-every 1 --max-minutes 0.05 --resume --out $RUN/c_minutes"
  [ceiling]="$PT --out $RUN/c_ceiling"
  [ceiling_replay_ema]="$PT --replay-data $RUN/data/scans/train.npz --replay-share 0.5 --ema-decay 0.9 --out $RUN/c_replay"
  [ceiling_resume]="$PT --checkpoint-every 1 --out $RUN/c_presume && $PT --steps 4 --checkpoint-every 1 --resume --out $RUN/c_presume"
  [ceiling_max_minutes]="$PT --steps 200 --checkpoint-every 1 --max-minutes 0.05 --out $RUN/c_pminutes"
)
# Four at a time: the demo network leaves the GPU idle, the start-up (imports, evaluation) is most of each case.
names=(${!CASES[@]}); running=0
for name in "${names[@]}"; do
  ( bash -c "${CASES[$name]}" > $OUT/logs/$name.log 2>&1; echo $? > $OUT/logs/$name.rc ) &
  running=$((running + 1)); if [ $running -ge 4 ]; then wait -n; running=$((running - 1)); fi
done
wait
failed=0
printf "| case | result | last log line |\n|---|---|---|\n" | tee $OUT/cuda_smoke.md
for name in $(printf "%s\n" "${names[@]}" | sort); do
  rc=$(cat $OUT/logs/$name.rc); line=$(grep -v "^\s*$" $OUT/logs/$name.log | tail -1 | cut -c1-120)
  if [ "$rc" = 0 ]; then result=PASS; else result="FAIL (exit $rc)"; failed=1; fi
  echo "| $name | $result | ${line//|//} |" | tee -a $OUT/cuda_smoke.md
done
echo "cuda smoke: $([ $failed = 0 ] && echo 'every case passes' || echo 'FAILURES above') in $(( $(date +%s) - t0 )) s" \
  | tee -a $OUT/cuda_smoke.md
tar czf $OUT/cuda_smoke_logs.tgz -C $OUT logs
exit $failed
