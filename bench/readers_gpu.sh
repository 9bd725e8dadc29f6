#!/usr/bin/env bash
# The judge's two pose readers, trained apart on one GPU, then the judge's known answers read there.
#   reader  (pretrained/demo_reader):  the committed reader fine-tuned under solid mess with pose-free images of
#           the Gaussian kinds (one Gaussian of a view's ink, or a cloud of 2-5), seed 1, channels 32 64 128
#   reader2 (pretrained/demo_reader2): trained from scratch, seed 2 (other broad poses and outfits), channels
#           24 48 96, under solid mess with pose-free images of the mean kind (16 other people's same view);
#           INIT2=pretrained/demo_reader2 continues the committed one instead (at LR2, default 1e-3 then)
# Neither sees a model's output, the bench or a reward's weights; each is checked on pose-free kinds it never saw.
# Usage (GPU machine, repo root): OUT=dir [RUN=runs/readers] [STEPS1=2000] [STEPS2=4000] [INIT2=DIR] [LR2=2e-3]
#   bash bench/readers_gpu.sh
set -euo pipefail
RUN=${RUN:-runs/readers}; OUT=${OUT:-$RUN/out}; STEPS1=${STEPS1:-2000}; STEPS2=${STEPS2:-4000}
INIT2=${INIT2:-}; LR2=${LR2:-$([ -n "$INIT2" ] && echo 1e-3 || echo 2e-3)}
export PYTHONUNBUFFERED=1
t0=$(date +%s); tick() { echo "TIME $1 $(( $(date +%s) - t0 )) s"; }
nvidia-smi --query-gpu=name --format=csv,noheader || true
mkdir -p $(dirname $RUN) $OUT
[ -f $RUN/data/bench/manifest.json ] || OMP_NUM_THREADS=16 python3 prepare_data.py --preset demo --run-dir $RUN \
  --device cpu > $OUT/data.log 2>&1 || { tail -5 $OUT/data.log; exit 1; }
tick data
OMP_NUM_THREADS=8 python3 posescore.py train --preset demo --run-dir $RUN --out $RUN/reader --train-on any --seed 1 \
  --init pretrained/demo_reader --num-broad 4000 --steps $STEPS1 --batch-size 64 --lr 1e-3 --mess 1 \
  --pose-free 0.25 --pose-free-kinds gaussian gaussians --threads 0 --log-every 500 --device cuda > $OUT/reader.log 2>&1 &
OMP_NUM_THREADS=8 python3 posescore.py train --preset demo --run-dir $RUN --out $RUN/reader2 --train-on any --seed 2 \
  ${INIT2:+--init $INIT2} --num-broad 4000 --steps $STEPS2 --batch-size 64 --channels 24 48 96 --lr $LR2 --mess 1 \
  --pose-free 0.25 --pose-free-kinds mean --threads 0 --log-every 500 --device cuda > $OUT/reader2.log 2>&1 &
wait
tick readers
for r in reader reader2; do  # fp16 weights, as committed
  python3 -c "import sys, safetensors.torch as st; p=sys.argv[1]; w=st.load_file(p); st.save_file({k: v.half() for k, v in w.items()}, p)" \
    $RUN/$r/diffusion_pytorch_model.safetensors
done
python3 bench/judge_check.py --run-dir $RUN --readers $RUN/reader $RUN/reader2 --device cuda --machine "one GPU" \
  --out $OUT/judge_check_gpu.json | tee $OUT/judge_check_gpu.txt
tick total
tar czf $OUT/readers.tgz -C $RUN reader reader2
