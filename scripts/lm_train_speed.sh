#!/usr/bin/env bash
# Issue 16, item 3: training speed of the language comparison's models
# (scripts/lm_compare.sh) measured alone, in one run, so that Mamba and the
# Transformer++ compare under the same conditions: `selective bench --train`
# on a random model of each shape, with the character vocabulary (72 ids
# after padding; batch 16 x 256) and GPT-NeoX's (50,280; batch 8 x 256).
#
#   scripts/lm_train_speed.sh [OUT.jsonl] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/lm/train-speed.jsonl}
STEPS=${2:-4}
cargo build --release --quiet
BIN=target/release/selective
mkdir -p "$(dirname "$OUT")"
: > "$OUT"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores" >&2
for vocab_batch in "72 16" "50280 8"; do
    set -- $vocab_batch
    vocab=$1 batch=$2
    # size | d_model | Mamba layers | Transformer layers | heads (as lm_compare.sh)
    while read -r size d ml tl heads; do
        [ -z "$size" ] && continue
        for arch in mamba transformer; do
            layers=$ml; extra=""
            [ "$arch" = transformer ] && { layers=$tl; extra="--n-head $heads"; }
            # shellcheck disable=SC2086
            $BIN bench --train --arch $arch --d-model "$d" --n-layer "$layers" $extra \
                --vocab-size "$vocab" --batch-size "$batch" --seq-len 256 --steps "$STEPS" \
                --threads 2 --json |
                python3 -c "import json,sys; r=json.load(sys.stdin)[0]; r.update(size='$size', arch='$arch', vocab=$vocab); print(json.dumps(r))" >> "$OUT"
            tail -1 "$OUT" | cut -c1-160 >&2
        done
    done <<< "
s 128 4 2 2
m 256 4 2 4
l 384 8 4 6
"
done
