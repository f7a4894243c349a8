#!/usr/bin/env bash
# FP8 vs bf16 training of the `1b` preset on the same data, seed and batches (issue 4's loss criterion).
#   bash experiments/fp8_vs_bf16.sh DATA_DIR OUT_DIR [STEPS]     # SEQ, BATCH, PRECISIONS ("bf16 fp8") may be set
# DATA_DIR is a `dsv3 prepare` folder (e.g. the one experiments/ablations.sh writes). The FP8 run follows the
# report's recipe (fine-grained FP8 GEMMs, bf16 AdamW moments); the bf16 run is the usual autocast baseline.
set -euo pipefail
data=$1; out=$2; steps=${3:-2000}
seq=${SEQ:-1024}; batch=${BATCH:-8}
common=(--preset 1b --data "$data" --seq-len $seq --micro-batch $batch --batch-size $batch --max-steps $steps
        --lr 6e-4 --min-lr 6e-5 --warmup-steps 100 --eval-interval 500 --eval-batches 10 --log-interval 10
        --save-interval 100000 --no-progress --seed 0)
mkdir -p "$out"
for precision in ${PRECISIONS:-bf16 fp8}; do
  python -m dsv3.cli train "${common[@]}" --precision $precision --out "$out/$precision" \
    > "$out/$precision.log" 2>&1 &
done
wait
[ -d "$out/bf16" ] && [ -d "$out/fp8" ] && python -m dsv3.cli plot "$out/bf16" "$out/fp8" --out "$out/plots"
