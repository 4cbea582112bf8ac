#!/usr/bin/env bash
# One GPU session: the six robust zoo entries trained by their recipes on the GPU, all at once (one process
# each; they start from the zoo's ssd_vgg, so ship that first). Run from the repository root on a CUDA machine
# whose python3 has torch + torchvision; missing dependencies come as wheels in .whl/.
#   OUT=/some/dir bash benchmarks/gpu_robust.sh
# Writes $OUT/robust.tar.part-* (split at 15 MB: cat them | tar x gives NAME.{safetensors,json}) and
# $OUT/logs.tar.gz (one training log per entry).
set -u
source "$(dirname "$0")/gpu_env.sh"
python3 -c "from advdet.data.registry import build_dataset; from advdet.models.zoo import ZOO_INPUT_SIZE
from advdet.training.tensor_cache import TensorCache
TensorCache.from_dataset(build_dataset('shapes-train', size=ZOO_INPUT_SIZE))"  # generate + cache once, not six times
Z=/tmp/robust_zoo L=/tmp/robust_logs
mkdir -p $Z $L
for n in ${ENTRIES:-robustdet robustdet-cfr ssd_vgg-mtd ssd_vgg-at-cls ssd_vgg-at-loc ssd_vgg-cwat}; do
  timeout "${TRAIN_TIMEOUT:-390}" python3 -m advdet -v zoo train "$n" --device cuda --threads 2 \
    --set max_minutes="${MAX_MINUTES:-5}" --out $Z > "$L/$n.log" 2>&1 &
done
wait
tail -n 2 $L/*.log
(cd $Z && tar cf - .) | split -b 15000000 - "$OUT/robust.tar.part-"
tar czf "$OUT/logs.tar.gz" -C $L .
ls -la $Z
