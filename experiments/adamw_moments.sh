#!/usr/bin/env bash
# AdamW moments in bf16 (the report's) against fp32, on the CPU: the quickstart's run (the `tiny` preset on the
# Python standard library, 500 steps of 16 x 256 tokens), both ways for each seed, one after the other.
#   bash experiments/adamw_moments.sh DATA_DIR OUT_DIR   # DATA_DIR: e.g. runs/quickstart/data; SEEDS ("0 1")
set -euo pipefail
data=$1; out=$2
mkdir -p "$out"
for seed in ${SEEDS:-0 1}; do
  for moments in fp32 bf16; do
    python -m dsv3.cli train --preset tiny --data "$data" --out "$out/seed${seed}_$moments" --seq-len 256 \
      --micro-batch 16 --batch-size 16 --max-steps 500 --lr 3e-3 --min-lr 3e-4 --warmup-steps 30 \
      --bias-update-speed 0.01 --eval-interval 125 --eval-batches 8 --save-interval 500 --keep-checkpoints 1 \
      --log-interval 10 --seed "$seed" --bf16-moments "$([ $moments = bf16 ] && echo true || echo false)" \
      --no-progress > "$out/seed${seed}_$moments.log" 2>&1
  done
done
grep -H val_loss "$out"/*/metrics.jsonl
