#!/usr/bin/env bash
# Time every stage of `make demo`, one make target at a time, in pipeline order; prints one line per
# stage and the total. Start from a clean run folder (`make clean`) to time everything.
# Usage: bash bench/demo_stages.sh [make variables, e.g. FROM_SCRATCH=1] | tee bench/results/demo_stages.txt
set -euo pipefail
RUN=${RUN:-runs/demo}
STAGES=(
  "data:$RUN/data/bench/manifest.json"
  "reward g_skel:$RUN/posescore/posescore_config.json"
  "pose reader:$RUN/pose_reader/posescore_config.json"
  "base model:$RUN/base/model_config.json"
  "DrPose:$RUN/drpose/model_config.json"
  "ceiling:$RUN/ceiling/model_config.json"
  "reconstruct base:$RUN/recon/base/manifest.json"
  "reconstruct drpose:$RUN/recon/drpose/manifest.json"
  "reconstruct ceiling:$RUN/recon/ceiling/manifest.json"
  "evaluate:demo"
)
mkdir -p "$(dirname $RUN)"; lines=(); start=$(date +%s)
for stage in "${STAGES[@]}"; do
  t=$(date +%s)
  make --no-print-directory RUN=$RUN "$@" "${stage#*:}" > $RUN.stage.log 2>&1 || { cat $RUN.stage.log; exit 1; }
  lines+=("${stage%%:*}: $(( $(date +%s) - t )) s")
done
tr '\r' '\n' < $RUN.stage.log | grep '^|\|^report:'  # the results table, without progress bars
rm -f $RUN.stage.log
printf '%s\n' "${lines[@]}"
echo "total: $(( $(date +%s) - start )) s ($(nproc) cores, $(python3 -c 'import platform; print(platform.processor() or platform.machine())'))"
