#!/usr/bin/env bash
# The balancing and MTP ablations of docs/experiments.md, at equal tokens, on the `small` preset.
#   bash experiments/ablations.sh CORPUS_DIR TOKENIZER_JSON OUT_DIR [TOKENS]
# Three runs on the same data, seed and schedule:
#   base    aux-loss-free balancing + sequence-wise loss, MTP D=1 (the report's recipe)
#   auxloss classic auxiliary-loss balancing (no bias update), MTP D=1
#   nomtp   aux-loss-free balancing, no MTP
# With two GPUs visible, two runs go side by side. Validation files are disjoint from training files.
set -euo pipefail
corpus=$1; tokenizer=$2; out=$3; tokens=${4:-100000000}
seq=${SEQ:-1024}; batch=${BATCH:-32}
steps=$(( (tokens + seq * batch - 1) / (seq * batch) ))
mkdir -p "$out"
if [ ! -f "$out/data/index.json" ]; then
  python -m dsv3.cli prepare "$corpus" --out "$out/data" --tokenizer "$tokenizer" --val-fraction 0.01 \
    --workers "$(nproc)" 2>&1 | grep -v "^tokenizing" | tail -12
fi
common=(--preset small --data "$out/data" --seq-len $seq --micro-batch $batch --batch-size $batch
        --max-steps $steps --lr 1e-3 --min-lr 1e-4 --warmup-steps 200 --eval-interval 250 --eval-batches 20
        --log-interval 25 --save-interval 100000 --no-progress --seed 0)
run() {  # name gpu args...
  local name=$1 gpu=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu python -m dsv3.cli train "${common[@]}" --out "$out/$name" "$@" > "$out/$name.log" 2>&1
}
ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -ge 2 ]; then
  run base 0 & run auxloss 1 --balance aux_loss & wait
  run nomtp 0 --mtp-depth 0
else
  run base 0; run auxloss 0 --balance aux_loss; run nomtp 0 --mtp-depth 0
fi
python -m dsv3.cli plot "$out/base" "$out/auxloss" --out "$out/plots_balance"
python -m dsv3.cli plot "$out/base" "$out/nomtp" --out "$out/plots_mtp"
