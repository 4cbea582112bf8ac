#!/bin/bash
# How these files were made (2026-12-07): bench_rad.py on three trees, alternated, two runs each, beside one
# zoo training (rtdetr) on the 2-core machine. Usage, from the repository root:
#   bash benchmarks/results/rad_frozen_heap_relu/run.sh 929adfd 5b1ee6c b566334
# 929adfd: before; 5b1ee6c: RAD's collections on a frozen heap; b566334: plus the relu split of the LRP rules.
set -euo pipefail
root=$PWD; out=${OUT:-$root/benchmarks/results/rad_frozen_heap_relu}
for c in "$@"; do rm -rf "/tmp/ab_$c"; mkdir -p "/tmp/ab_$c"; git archive "$c" src benchmarks/bench_rad.py | tar -x -C "/tmp/ab_$c"; done
for i in 1 2; do
  for c in "$@"; do
    (cd "/tmp/ab_$c" && PYTHONPATH="/tmp/ab_$c/src" OMP_NUM_THREADS=1 "$root/.venv/bin/python" benchmarks/bench_rad.py \
      --skip-throughput --ratio-models yolov3,ssd_vgg --ratio-batch 8 --ratio-steps 1 --repeats 2 --memory \
      --models yolov3,ssd_vgg --batch 8 --note "A/B/C run $i of tree $c" --json "$out/${c}_$i.json")
  done
done
