#!/usr/bin/env bash
# Issue 16, item 3: Mamba against the Transformer++ on Tiny Shakespeare at
# equal parameters and equal training tokens, by characters and with the
# GPT-NeoX BPE tokenizer, at three sizes (docs/RESULTS.md, "Language");
# and Mamba-2 beside them at the middle size by characters (char-m-mamba2).
#
#   scripts/lm_compare.sh [RUNS_DIR] [NAME ...]     (default runs/lm, every run)
#   LRS="1e-3 6e-3" scripts/lm_compare.sh runs/lm char-s-mamba char-s-transformer
#                     the same runs at other peak learning rates, named NAME-lrLR
#
# Each run trains with `selective train`, then scores the held-out 10 % of
# the text (the trainer's validation split) in windows of 256 tokens (the
# training length) and of 1024 (four times it). Everything a run did lands in
# RUNS_DIR/NAME/: the trainer's files, time.txt (wall seconds of training),
# score-256.json, score-1024.json. Deterministic given the seed (the losses
# repeat bit for bit at any thread count); the wall times are this machine's.
# `cargo run --release --example lm_scaling -- RUNS_DIR docs/results/lm` then
# writes the table, the JSON summary and the plots.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/lm}
shift || true
cargo build --release --quiet
mkdir -p "$RUNS"
# a copy, so that rebuilding the project while the runs go on changes nothing
BIN="$RUNS/selective"
cp target/release/selective "$BIN"

# name | tokenizer | d_model | Mamba layers | Transformer layers | heads | lr
# Mamba gets twice the Transformer's layers at the same width: a Mamba block
# has about 6 D^2 parameters, a Transformer++ layer 12 D^2 (4 D^2 attention,
# 8 D^2 SwiGLU), as the paper pairs them.
SIZES="
s 128 4 2 2 3e-3
m 256 4 2 4 2e-3
l 384 8 4 6 1e-3
"
# char: 500 steps of 16 x 256 = 2.05M tokens (about two passes over the
# training text); bpe: 300 steps of 8 x 256 = 614K tokens (about two passes).
run() {
    local name=$1 tok=$2 arch=$3 d=$4 layers=$5 heads=$6 lr=$7
    [ -n "${LR_OF_RUN:-}" ] && { lr=$LR_OF_RUN; name="$name-lr$lr"; }
    local out="$RUNS/$name"
    if [ -f "$out/score-1024.json" ]; then echo "$name: done already"; return; fi
    rm -rf "$out"
    local tokflags batch steps
    case $tok in
        char) tokflags="--char-vocab"; batch=16; steps=500 ;;
        bpe) tokflags="--tokenizer data/gpt-neox-20b-tokenizer.json"; batch=8; steps=300 ;;
    esac
    local archflags="--arch $arch"
    [ "$arch" = transformer ] && archflags="$archflags --n-head $heads"
    # Mamba-2 at Mamba-1's parameters: heads of 64, one group, N = 64
    # (char-m: 431K parameters per layer against Mamba-1's 438K)
    [ "$arch" = mamba2 ] && archflags="$archflags --head-dim 64 --n-groups 1 --d-state 64"
    echo "== $name: $tok $arch d_model $d n_layer $layers lr $lr, $steps steps of $batch x 256"
    local t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    $BIN train --out "$out" --data data/tinyshakespeare.txt $tokflags $archflags \
        --d-model "$d" --n-layer "$layers" --batch-size "$batch" --seq-len 256 \
        --steps "$steps" --lr "$lr" --min-lr 1e-5 --eval-every 50 --eval-batches 10 \
        --save-every "$steps" --log-every 50 --seed 0 --threads 2 2> "$out.log"
    local t1=$(date +%s.%N)
    mv "$out.log" "$out/train.log"
    echo "$t1 - $t0" | bc > "$out/time.txt"
    for w in 256 1024; do
        $BIN score --model "$out/model" --text-file data/tinyshakespeare.txt \
            --held-out 0.1 --window $w --json --threads 2 > "$out/score-$w.json"
    done
    echo "$name: $(cat "$out/time.txt") s, $(cat "$out/score-256.json")"
}

for tok in char bpe; do
    while read -r size d ml tl heads lr; do
        [ -z "$size" ] && continue
        for arch in mamba transformer mamba2; do
            # Mamba-2 beside Mamba-1 at one size (issue 18): char-m
            [ "$arch" = mamba2 ] && [ "$tok-$size" != char-m ] && continue
            name="$tok-$size-$arch"
            if [ $# -gt 0 ] && ! printf '%s\n' "$@" | grep -qx "$name"; then continue; fi
            layers=$ml; [ "$arch" = transformer ] && layers=$tl
            if [ -n "${LRS:-}" ]; then
                for other in $LRS; do
                    LR_OF_RUN=$other run "$name" "$tok" "$arch" "$d" "$layers" "$heads" "$lr"
                done
            else
                run "$name" "$tok" "$arch" "$d" "$layers" "$heads" "$lr"
            fi
        done
    done <<< "$SIZES"
done
