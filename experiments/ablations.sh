#!/usr/bin/env bash
# The balancing and MTP ablations of docs/experiments.md, at equal tokens, on the `small` preset.
#   bash experiments/ablations.sh CORPUS_DIR OUT_DIR [TOKENS]    # SEQ, BATCH, VOCAB, COMPILE, RUNS may be set
# Prepares CORPUS_DIR once (a byte-level BPE of VOCAB tokens trained on the training files, 1% of the files held
# out for validation), then trains three runs on the same data, seed and schedule:
#   base    aux-loss-free balancing + sequence-wise loss, MTP D=1 (the report's recipe)
#   nomtp   aux-loss-free balancing, no MTP
#   auxloss classic auxiliary-loss balancing (no bias update), no MTP
# Balancing is compared between nomtp and auxloss (neither has MTP), MTP between base and nomtp.
# RUNS (default "base nomtp auxloss") trains a subset, so that the runs can be split over several shorter sessions
# on a machine that may be taken back between them; the plots are drawn once all three exist.
# Warm-up (6.6M tokens), evaluation spacing (8.2M) and evaluation size (655K tokens) are fixed in tokens, so runs
# at different batch sizes evaluate at the same points. The runs go side by side, spread over the visible GPUs: one
# run of this size leaves much of an H200 idle (kernel-latency bound), so sharing a GPU costs each run little
# (measured on an H200: two runs at batch 64 side by side make about 315K tokens/s each, so the balancing pair's
# 200M tokens take about 5.5 minutes).
set -euo pipefail
corpus=$1; out=$2; tokens=${3:-100000000}
[[ $tokens =~ ^[0-9]+$ ]] || { echo "ablations.sh: TOKENS must be a number, got '$tokens' (one CORPUS_DIR only)" >&2; exit 2; }
seq=${SEQ:-1024}; batch=${BATCH:-64}; vocab=${VOCAB:-16384}  # COMPILE=false to skip torch.compile
steps=$(( (tokens + seq * batch - 1) / (seq * batch) ))
mkdir -p "$out"
if [ ! -f "$out/data/index.json" ]; then
  python -m dsv3.cli prepare "$corpus" --out "$out/data" --vocab-size "$vocab" --val-fraction 0.01 \
    --workers "$(nproc)" 2>&1 | grep -v "^tokenizing" | tail -12
fi
common=(--preset small --data "$out/data" --seq-len $seq --micro-batch $batch --batch-size $batch
        --max-steps $steps --lr 1e-3 --min-lr 1e-4 --warmup-steps $((6553600 / (seq * batch)))
        --eval-interval $((8192000 / (seq * batch))) --eval-batches $(( (655360 + seq * batch - 1) / (seq * batch) ))
        --log-interval 25 --save-interval 100000 --no-progress --seed 0 --compile "${COMPILE:-true}")
ngpu=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
i=0
run() {  # name args...
  local name=$1; shift
  CUDA_VISIBLE_DEVICES=$(( i++ % ngpu )) python -m dsv3.cli train "${common[@]}" --out "$out/$name" "$@" \
    > "$out/$name.log" 2>&1 &
}
declare -A flags=([base]="" [nomtp]="--mtp-depth 0" [auxloss]="--balance aux_loss --mtp-depth 0")
for name in ${RUNS:-base nomtp auxloss}; do
  # shellcheck disable=SC2086  # the flags are words
  run "$name" ${flags[$name]}
done
wait
if [ -d "$out/base" ] && [ -d "$out/nomtp" ] && [ -d "$out/auxloss" ]; then
  python -m dsv3.cli plot "$out/nomtp" "$out/auxloss" --out "$out/plots_balance"
  python -m dsv3.cli plot "$out/base" "$out/nomtp" --out "$out/plots_mtp"
fi
