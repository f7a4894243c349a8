#!/usr/bin/env bash
# FP8 vs bf16 training of the `1b` preset on the same data, seed and batches (issue 4's loss criterion).
#   bash experiments/fp8_vs_bf16.sh DATA_DIR OUT_DIR [STEPS]
#   # SEQ, BATCH, PRECISIONS ("bf16 fp8"), SEEDS ("0"), COMPILE (false), BF16_MOMENTS, GPUS may be set
# GPUS (e.g. "0 1") spreads the seeds over those GPUs, the i-th seed's runs on the (i mod n)-th; unset, every run
# shares the default GPU.
# BF16_MOMENTS (true/false) sets both runs' AdamW moments; unset, each takes the trainer's default, bf16 moments for
# both precisions (before session 13 the bf16 run's default was fp32), so the two differ only in their GEMMs.
# DATA_DIR is a `dsv3 prepare` folder (e.g. the one experiments/ablations.sh writes). The FP8 run follows the
# report's recipe (fine-grained FP8 GEMMs, bf16 AdamW moments); the bf16 run is the usual autocast baseline. Each
# seed (initialisation and data order) trains both precisions, into OUT_DIR/PRECISION (seed 0) or
# OUT_DIR/PRECISION_seedN: one seed cannot resolve a 0.25% criterion (docs/experiments.md), so the spread between
# seeds is what the FP8 gap is judged against. All runs go side by side.
set -euo pipefail
data=$1; out=$2; steps=${3:-2000}
seq=${SEQ:-1024}; batch=${BATCH:-8}
common=(--preset 1b --data "$data" --seq-len $seq --micro-batch $batch --batch-size $batch --max-steps $steps
        --lr 6e-4 --min-lr 6e-5 --warmup-steps 100 --eval-interval 500 --eval-batches 10 --log-interval 10
        --save-interval 100000 --no-progress --compile "${COMPILE:-false}"
        ${BF16_MOMENTS:+--bf16-moments "$BF16_MOMENTS"})
mkdir -p "$out"
runs=()
gpus=(${GPUS:-})
i=0
for seed in ${SEEDS:-0}; do
  for precision in ${PRECISIONS:-bf16 fp8}; do
    name=$precision$([ "$seed" = 0 ] || echo "_seed$seed")
    runs+=("$out/$name")
    ( [ ${#gpus[@]} = 0 ] || export CUDA_VISIBLE_DEVICES=${gpus[i % ${#gpus[@]}]}
      exec python -m dsv3.cli train "${common[@]}" --seed "$seed" --precision "$precision" --out "$out/$name" ) \
      > "$out/$name.log" 2>&1 &
  done
  i=$((i + 1))
done
wait
python -m dsv3.cli plot "${runs[@]}" --out "$out/plots"
