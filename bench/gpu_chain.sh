#!/usr/bin/env bash
# One job of a long DrPose run carried across short jobs (a cluster's time limit, a GPU booked
# 10 minutes at a time) on machines that keep nothing between jobs. Run it once per job, from the
# repo root:
#
#   RUN=runs/full CHAIN_IN=prev CHAIN_OUT=next JOB_MINUTES=8 bash bench/gpu_chain.sh --preset full --device cuda
#
# Arguments go to finetune.py (give every job the same ones); --run-dir, --resume and --max-minutes
# are set here. With shared storage CHAIN_IN and CHAIN_OUT may be one folder.
#
# What a job needs:   the code; $RUN/base/, $RUN/posescore/, $RUN/data/drpose/ (+ data/bench/ for the
#                     fixed-input evaluation), the same files in every job; $CHAIN_IN/ = what the
#                     previous job wrote to its $CHAIN_OUT (nothing for the first job).
# What it copies out: $CHAIN_OUT/ckpt.tar          the newest checkpoint (LoRA weights + optimizer + RNG
#                                                  state + state.json) and metrics.jsonl, a few MB
#                     $CHAIN_OUT/ckpt.tar.sha256   its checksum, checked by the next job before it resumes
#                     $CHAIN_OUT/inputs.sha256     checksums of base/, posescore/ and the pairs, made by the
#                                                  first job and checked by every later one
#                     $CHAIN_OUT/chain.log         one line per job: steps done, checkpoint checksum, minutes
#                     $CHAIN_OUT/job.log           this job's output
#                     $CHAIN_OUT/drpose_lora.tar   when the run is done: drpose/ without the merged weights
#                                                  (lora/ adapter, configs, metrics, reward curve); merge on
#                                                  top of base/ as finetune.save_drpose says
# JOB_MINUTES is finetune.py's --max-minutes: keep a margin under the job's limit for start-up and copies.
set -euo pipefail
RUN=${RUN:-runs/demo}; CHAIN_IN=${CHAIN_IN:-}; CHAIN_OUT=${CHAIN_OUT:?set CHAIN_OUT}; JOB_MINUTES=${JOB_MINUTES:-8}
OUT_DIR=${OUT_DIR:-$RUN/drpose}; CKPT=${OUT_DIR}_ckpt
PY=${PY:-python3}
mkdir -p "$CHAIN_OUT"
t0=$(date +%s)
INPUTS=$(cd "$RUN" && ls base/*.json base/*.safetensors posescore/*.json posescore/*.safetensors \
         data/drpose/pairs.npz data/drpose/manifest.json)

# --- inputs: the same files in every job ---
if [ -n "$CHAIN_IN" ] && [ -f "$CHAIN_IN/inputs.sha256" ]; then
  (cd "$RUN" && sha256sum --quiet -c "$(realpath "$CHAIN_IN")/inputs.sha256") \
    || { echo "gpu_chain: $RUN's inputs differ from the first job's ($CHAIN_IN/inputs.sha256)"; exit 1; }
  cp "$CHAIN_IN/inputs.sha256" "$CHAIN_OUT/inputs.sha256.new"
else
  (cd "$RUN" && sha256sum $INPUTS) > "$CHAIN_OUT/inputs.sha256.new"
fi
mv "$CHAIN_OUT/inputs.sha256.new" "$CHAIN_OUT/inputs.sha256"

# --- the previous job's checkpoint, verified before it is used ---
job=1; from=0
if [ -n "$CHAIN_IN" ] && [ -f "$CHAIN_IN/ckpt.tar" ]; then
  (cd "$CHAIN_IN" && sha256sum --quiet -c ckpt.tar.sha256) \
    || { echo "gpu_chain: $CHAIN_IN/ckpt.tar does not match its checksum; copy it again"; exit 1; }
  rm -rf "$CKPT"; mkdir -p "$CKPT"; tar -xf "$CHAIN_IN/ckpt.tar" -C "$CKPT"
  from=$(ls -d "$CKPT"/step_* | tail -1 | sed 's/.*step_0*//'); from=${from:-0}
  job=$(( $(grep -c '^job' "$CHAIN_IN/chain.log" 2>/dev/null || echo 0) + 1 ))
  [ "$(realpath "$CHAIN_IN")" = "$(realpath "$CHAIN_OUT")" ] || cp "$CHAIN_IN/chain.log" "$CHAIN_OUT/chain.log"
fi
echo "gpu_chain: job $job resumes at step $from ($(date -u +%FT%TZ))"

# --- train until the budget or the end; finetune.py stops with a checkpoint ---
set -o pipefail
$PY finetune.py --run-dir "$RUN" --out "$OUT_DIR" --resume --max-minutes "$JOB_MINUTES" "$@" 2>&1 \
  | tr '\r' '\n' | grep -v '%|' | tee "$CHAIN_OUT/job.log"

# --- copy out the newest checkpoint with its checksum ---
last=$(ls -d "$CKPT"/step_* | tail -1)
step=$(basename "$last" | sed 's/step_0*//'); step=${step:-0}
tar -cf "$CHAIN_OUT/ckpt.tar.new" -C "$CKPT" "$(basename "$last")" $(cd "$CKPT" && ls metrics.jsonl 2>/dev/null || true)
mv "$CHAIN_OUT/ckpt.tar.new" "$CHAIN_OUT/ckpt.tar"
(cd "$CHAIN_OUT" && sha256sum ckpt.tar > ckpt.tar.sha256)
weights=$(sha256sum "$last/model.safetensors" | cut -c1-16)
done_=no
if [ -f "$OUT_DIR/config.json" ] && [ "$OUT_DIR/config.json" -nt "$CHAIN_OUT/inputs.sha256" ]; then
  done_=yes
  tar -cf "$CHAIN_OUT/drpose_lora.tar" -C "$(dirname "$OUT_DIR")" \
    --exclude="$(basename "$OUT_DIR")/diffusion_pytorch_model.safetensors" "$(basename "$OUT_DIR")"
fi
echo "job $job: steps $from -> $step, ckpt.tar $(cut -c1-16 "$CHAIN_OUT/ckpt.tar.sha256"), weights $weights," \
     "$(( ($(date +%s) - t0) / 60 )) min, done $done_" | tee -a "$CHAIN_OUT/chain.log"
