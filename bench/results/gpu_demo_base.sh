#!/usr/bin/env bash
# Train the demo-architecture base I2MV model on one GPU (see pretrained/demo_base/README.md).
# Usage (on the GPU machine, repo root): OUT=dir bash bench/results/gpu_demo_base.sh
# Env knobs (defaults are what made pretrained/demo_base): SCANS VAL DEV DATA_DEV BUDGET_S PROBE MAXSTEPS
# DATA_DEV=cpu: `prepare_data.py --device cuda` fails in pose_features (betas on cpu, body on cuda).
set -euo pipefail
SCANS=${SCANS:-3000}; VAL=${VAL:-100}; DEV=${DEV:-cuda}; DATA_DEV=${DATA_DEV:-cpu}; BUDGET_S=${BUDGET_S:-300}
PROBE=${PROBE:-200}; MAXSTEPS=${MAXSTEPS:-30000}; RUN=${RUN:-runs/gpu_demo}
DEADLINE_S=${DEADLINE_S:-500}  # whole script must end inside a 10-minute job limit
nvidia-smi --query-gpu=name --format=csv 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch, diffusers, smplx, tyro, trimesh, mannequin; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())"
t0=$(date +%s)
python3 prepare_data.py --preset demo --run-dir $RUN --num-scans $SCANS --num-val-scans $VAL --device $DATA_DEV
t1=$(date +%s); echo "TIME prepare_data $((t1-t0)) s"
python3 pretrain.py --preset demo --run-dir $RUN --device $DEV --batch-size 32 --steps $PROBE --num-eval 0 --checkpoint-every 100000 --log-every 25
t2=$(date +%s); echo "TIME probe ($PROBE steps) $((t2-t1)) s"
# training budget: BUDGET_S, less if data + probe ate into the deadline (90 s kept for eval and copies)
LEFT=$((DEADLINE_S - (t2 - t0) - 90)); [ $LEFT -lt $BUDGET_S ] && BUDGET_S=$LEFT
echo "BUDGET_S $BUDGET_S"
N=$(python3 - "$RUN" "$BUDGET_S" "$MAXSTEPS" <<'PY'
import json, sys, statistics
run, budget, cap = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
lines = [json.loads(l) for l in open(f"{run}/base/metrics.jsonl") if l.strip()]
sps = statistics.median(l["sec_per_step"] for l in lines[1:] or lines)
# validation every 100 steps and the log syncs cost extra: assume 10% on top
n = int(budget / (sps * 1.1)) // 500 * 500
print(min(cap, max(500, n)))
print(f"sec_per_step median {sps:.4f} -> steps {min(cap, max(500, n))}", file=sys.stderr)
PY
)
echo "STEPS $N"
python3 pretrain.py --preset demo --run-dir $RUN --device $DEV --batch-size 32 --steps $N --lr 1e-3 --warmup-steps 200 --num-eval 48 --checkpoint-every 100000 --log-every 50 --val-every 500
t3=$(date +%s); echo "TIME train ($N steps + eval) $((t3-t2)) s"
echo "TIME total $((t3-t0)) s"
for f in config.json diffusion_pytorch_model.safetensors model_config.json val_metrics.json samples_val.png samples_bench.png metrics.jsonl; do
  cp $RUN/base/$f "$OUT/" || echo "missing $f"
done
ls -la $OUT
