#!/usr/bin/env bash
# Train a demo-resolution g_skel on one GPU and time the reconstruction stages there.
#   reader: the pose reader (pretrained/demo_reader): scans + broad poses in any orientation, seed 1
#   reward: the reward's g_skel (pretrained/demo_gskel): scans + broad poses as they come, seed 0
# Usage (GPU machine, repo root): OUT=dir bash bench/results/gpu_demo_gskel.sh reader|reward [stages]
set -euo pipefail
WHAT=$1; RUN=${RUN:-runs/demo}; STEPS=${STEPS:-6000}; BROAD=${BROAD:-4000}
case $WHAT in
  reader) FOLDER=pose_reader; FLAGS="--train-on any --seed 1" ;;
  reward) FOLDER=posescore; FLAGS="--train-on broad --seed 0" ;;
esac
nvidia-smi --query-gpu=name --format=csv,noheader || true
t0=$(date +%s)
[ -f $RUN/data/bench/manifest.json ] || python3 prepare_data.py --preset demo --run-dir $RUN --device cuda
echo "TIME prepare_data $(( $(date +%s) - t0 )) s"
python3 posescore.py train --preset demo --run-dir $RUN --out $RUN/$FOLDER $FLAGS \
  --num-broad $BROAD --steps $STEPS --batch-size 64 --channels 32 64 128 --lr 2e-3 --threads 0 --log-every 500 --device cuda
echo "TIME $WHAT $(( $(date +%s) - t0 )) s"
mkdir -p $OUT/$WHAT
for f in config.json diffusion_pytorch_model.safetensors posescore_config.json validation.json metrics.jsonl maps.png; do
  cp $RUN/$FOLDER/$f $OUT/$WHAT/ || echo "missing $f"
done
if [ "${2:-}" = stages ]; then  # needs pose_reader/ (pretrained/demo_reader) for the fit
  [ -f $RUN/pose_reader/posescore_config.json ] || python3 posescore.py train --preset demo --run-dir $RUN \
    --out $RUN/pose_reader --train-on any --seed 1 --init pretrained/demo_reader --steps 0
  [ -f $RUN/base/model_config.json ] || python3 pretrain.py --preset demo --run-dir $RUN --init pretrained/demo_base --steps 0 --device cuda
  python3 -X faulthandler bench/reconstruct_stages.py --run-dir $RUN --device cuda --count 8 | tee $OUT/reconstruct_stages_gpu.txt
  python3 -X faulthandler bench/reconstruct_stages.py --run-dir $RUN --device cpu --count 8 | tee $OUT/reconstruct_stages_gpu_machine_cpu.txt
fi
echo "TIME total $(( $(date +%s) - t0 )) s"
