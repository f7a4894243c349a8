#!/usr/bin/env bash
# Training throughput of the `1b` preset from a trained router (issue 3): train STEPS steps on text, then time dsv3
# against transformers, both starting from that checkpoint (router biases included), on the same text.
#   bash experiments/train_throughput_trained.sh DATA_DIR OUT_DIR [STEPS [BENCHMARK FLAGS...]]
# e.g. bash experiments/train_throughput_trained.sh runs/text runs/tt 300 --hf-impls grouped_mm
# DATA_DIR is a `dsv3 prepare` folder in the `1b`'s vocabulary, DeepSeek-V3's tokenizer:
#   dsv3 prepare SOURCES --out DATA_DIR --tokenizer PATH/TO/deepseek-v3/tokenizer.json
# Why: at random init the router sends most of a sequence's tokens to the same few experts (docs/benchmarks.md,
# session 19), a state the trained model leaves. Measured in session 20: the same speed within 1% either way.
set -euo pipefail
data=$1; out=$2; steps=${3:-300}
shift $(( $# < 3 ? $# : 3 ))
mkdir -p "$out"
python -m dsv3.cli train --preset 1b --data "$data" --seq-len 2048 --micro-batch 8 --batch-size 8 \
  --max-steps "$steps" --lr 6e-4 --min-lr 6e-5 --warmup-steps 50 --eval-interval "$steps" --eval-batches 4 \
  --log-interval 10 --save-interval 100000 --no-progress --compile true --out "$out/run" > "$out/train.log" 2>&1
python -m benchmarks.train_throughput --model "$out/run/model" --data "$data" --batch 8 --seq 2048 --steps 4 \
  --compile --hf-impls "" "$@"
