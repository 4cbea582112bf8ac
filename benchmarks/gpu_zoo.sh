#!/usr/bin/env bash
# One GPU session: (1) bench_models.py timings on the GPU, (2) the ssd_vgg zoo entry trained by its recipe on
# the GPU (evaluated and written from the CPU). Run from the repository root on a CUDA machine whose python3
# has torch + torchvision; the other dependencies come as wheels in .whl/ when they are missing there.
#   OUT=/some/dir bash benchmarks/gpu_zoo.sh
# Writes $OUT/models_gpu.json, $OUT/bench.log, $OUT/zoo/ssd_vgg.{safetensors,json}, $OUT/train.log.
set -u
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/bench.log"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/bench.log"
timeout 90 python3 benchmarks/bench_models.py --device cuda --repeats 10 --json "$OUT/models_gpu.json" 2>&1 | tee -a "$OUT/bench.log"
mkdir -p "$OUT/zoo"
timeout "${TRAIN_TIMEOUT:-420}" python3 -m advdet -v zoo train ssd_vgg --device cuda --threads 8 \
  --set log_every=250 --set max_minutes="${MAX_MINUTES:-5.5}" --out "$OUT/zoo" 2>&1 | tee "$OUT/train.log"
