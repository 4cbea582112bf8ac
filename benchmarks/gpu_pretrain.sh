#!/usr/bin/env bash
# One GPU session for the pretraining stage (issue 21, docs/benchmark.md): the backbone entries trained by
# their recipes on the GPU (the procedural set rendered by 16 CPU processes; evaluation and the written
# weights on the CPU). Run from the repository root on a CUDA machine whose python3 has torch + torchvision.
#   OUT=/some/dir ENTRIES="vgg_pre darknet_pre" MAX_MINUTES=4 bash benchmarks/gpu_pretrain.sh
# Writes $OUT/zoo/NAME.{safetensors,json} and $OUT/NAME.log per entry; a run stopped by MAX_MINUTES leaves its
# checkpoint in $OUT/runs/NAME (bring it back and continue with `advdet zoo train NAME --resume --run-dir ...`).
set -u
source "$(dirname "$0")/gpu_env.sh"
mkdir -p "$OUT/zoo" "$OUT/runs"
for name in ${ENTRIES:-vgg_pre darknet_pre resnet_pre}; do
  timeout "${TRAIN_TIMEOUT:-560}" python3 -m advdet -v zoo train "$name" --device cuda --threads 8 --workers 16 \
    --set log_every=500 --set max_minutes="${MAX_MINUTES:-4}" --out "$OUT/zoo" --run-dir "$OUT/runs/$name" \
    2>&1 | tee "$OUT/$name.log"
done
