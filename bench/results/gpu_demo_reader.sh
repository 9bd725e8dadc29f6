#!/usr/bin/env bash
# Train the demo-resolution pose reader on one GPU (see pretrained/demo_reader/README.md) and time
# the reconstruction stages on the GPU and on that machine's CPU.
# Usage (GPU machine, repo root): OUT=dir bash bench/results/gpu_demo_reader.sh
set -euo pipefail
RUN=${RUN:-runs/demo}; STEPS=${STEPS:-6000}; BROAD=${BROAD:-4000}
nvidia-smi --query-gpu=name --format=csv,noheader || true
t0=$(date +%s)
[ -f $RUN/data/bench/manifest.json ] || python3 prepare_data.py --preset demo --run-dir $RUN --device cuda
echo "TIME prepare_data $(( $(date +%s) - t0 )) s"
python3 posescore.py train --preset demo --run-dir $RUN --out $RUN/pose_reader --train-on any --seed 1 \
  --num-broad $BROAD --steps $STEPS --batch-size 64 --channels 32 64 128 --lr 2e-3 --threads 0 --log-every 500 --device cuda
echo "TIME reader $(( $(date +%s) - t0 )) s"
for f in config.json diffusion_pytorch_model.safetensors posescore_config.json validation.json metrics.jsonl maps.png; do
  cp $RUN/pose_reader/$f $OUT/ || echo "missing $f"
done
[ -f $RUN/base/drpose_config.json ] || python3 finetune.py pretrain --preset demo --run-dir $RUN --init pretrained/demo_base --steps 0 --device cuda
python3 bench/reconstruct_stages.py --run-dir $RUN --device cuda --count 8 | tee $OUT/reconstruct_stages_gpu.txt
python3 bench/reconstruct_stages.py --run-dir $RUN --device cpu --count 8 | tee $OUT/reconstruct_stages_gpu_machine_cpu.txt
echo "TIME total $(( $(date +%s) - t0 )) s"
