#!/usr/bin/env bash
# Retrain the four torchvision-family zoo detectors from the ONE pretrained body resnet_pre (issue 21), one
# after the other, one CPU thread each, every run resumable. Run from the repository root:
#   OUT=/work/runs/zoo_after nohup bash benchmarks/zoo_resnet_family.sh > /work/runs/zoo_after.log 2>&1 &
# Writes $OUT/zoo/NAME.{safetensors,json} (NOT the shipped zoo_weights: compare with the bar first) and keeps
# checkpoints in $OUT/runs/NAME; rerunning the same command continues where it stopped (--resume starts fresh
# when there is no checkpoint). ENTRIES overrides the list; THREADS (default 1) the torch threads.
set -eu
OUT=${OUT:?set OUT to a folder}
mkdir -p "$OUT/zoo" "$OUT/runs"
export OMP_NUM_THREADS=${THREADS:-1}
for name in ${ENTRIES:-fcos retinanet fasterrcnn maskrcnn}; do
  if [ -f "$OUT/zoo/$name.safetensors" ]; then echo "$name: done ($OUT/zoo/$name.safetensors)"; continue; fi
  echo "$name: training from resnet_pre ($(date -u +%FT%TZ))"
  uv run --frozen advdet -v --threads "${THREADS:-1}" zoo train "$name" --threads "${THREADS:-1}" --resume \
    --out "$OUT/zoo" --run-dir "$OUT/runs/$name"
done
