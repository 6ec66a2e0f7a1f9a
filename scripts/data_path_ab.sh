#!/bin/bash
# The set-up of a pretrain run on a caption set, whole-process wall time, first run (no kept encodings) and second.
#
#   scripts/data_path_ab.sh DATA_DIR TOKENIZER_DIR VISION_DIR [OLD_SRC]
#
# DATA_DIR holds pretrain_data.jsonl and pretrain_images/ (`minimind-v synth --like minimind-v-pretrain`);
# VISION_DIR a CLIP ViT-B/16 (random weights are fine); OLD_SRC another checkout's src/ to time the same way first
# (e.g. a `git worktree` of 774d3c4). One step, no feature cache: what is timed is everything before and around it.
set -e
DATA=$1 TOKENIZER=$2 VISION=$3 OLD=$4
OUT=$(mktemp -d)
export MINIMIND_V_CACHE=$OUT/cache
run() { # label, PYTHONPATH
  rm -rf "$OUT/run"
  /usr/bin/time -f "$1: %e s wall, %M KB peak RSS" env PYTHONPATH="$2" minimind-v train --stage pretrain \
    --preset minimind2-small-v --no-feature-cache --max-steps 1 --data "$DATA/pretrain_data.jsonl" \
    --images "$DATA/pretrain_images" --out "$OUT/run" --tokenizer "$TOKENIZER" --vision "$VISION" --from none 2>&1 \
    | grep -E "wall|set-up|encod|done:"
}
if [ -n "$OLD" ]; then run "old, first" "$OLD"; run "old, second" "$OLD"; fi
run "first" ""
run "second" ""
rm -rf "$OUT"
