#!/bin/bash
# Issue #23's GPU figures in one run: pretrain and SFT samples/s at the real lengths (stand-ins of the original's
# data), ours against the original's loop, at batch 16 and bigger batches, and the epoch times they imply for the
# real data's sizes (595K captions x 4 epochs, 300K conversations x 2). One JSON object (indented) per bench on stdout.
#
#   scripts/gpu_bench.sh TOKENIZER_DIR [STEPS] [BATCHES]       # e.g. shared/reference/minimind2-v-tokenizer 10 "16 64"
#   N=64 WARMUP=0 scripts/gpu_bench.sh TOKENIZER_DIR 1 16         # a CPU smoke run of the script itself
#
# The towers are random CLIP ViT-B/16 of the true shape (bench builds them); nothing is downloaded. The naive
# loop (the original's way) runs at the original's own defaults only: batch 16 in pretrain, 8 in SFT (and 16).
set -euo pipefail
TOKENIZER=$1 STEPS=${2:-10} BATCHES=${3:-"16 64 128"} N=${N:-4000} WARMUP=${WARMUP:-3}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
minimind-v synth --like minimind-v-pretrain --n "$N" --out "$OUT/pre" >&2
minimind-v synth --like minimind-v-sft --n "$N" --out "$OUT/sft" >&2
bench() { # stage, data dir, data file, images, epoch samples, batch, mode
  minimind-v bench --preset minimind2-small-v --stage "$1" --data "$2/$3" --images "$2/$4" --tokenizer "$TOKENIZER" \
    --epoch-samples "$5" --batch-size "$6" --mode "$7" --steps "$STEPS" --warmup "$WARMUP" --no-generate
}
bench sft "$OUT/sft" sft_data.jsonl sft_images 300000 8 both
for batch in $BATCHES; do
  mode=fast; [ "$batch" = 16 ] && mode=both
  bench pretrain "$OUT/pre" pretrain_data.jsonl pretrain_images 595000 "$batch" "$mode"
  bench sft "$OUT/sft" sft_data.jsonl sft_images 300000 "$batch" "$mode"
done
