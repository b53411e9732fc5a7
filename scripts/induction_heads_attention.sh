#!/usr/bin/env bash
# Issue 16, item 4: induction heads with attention (the paper's Table 2
# MHA rows), the recipe of the shipped S6 model's first two stages
# (docs/RESULTS.md, "Induction heads"): 2 layers, d_model 32, vocabulary 16;
# stage 1 at length 64 (batch 32, lr 1e-3, until 100 % validation accuracy),
# stage 2 from its weights at length 256 (batch 16, lr 5e-4, 3000 steps),
# stage 3 from those at 256 (lr 1e-3, 3000 steps).
# Two position schemes: rotary, and learned absolute positions with a table
# of 2^14 rows (rows past the training length are never trained; longer
# sequences cannot be read at all).
#
#   scripts/induction_heads_attention.sh [RUNS_DIR] [THREADS]
#
# Writes RUNS_DIR/ih-attn-{rotary,learned}-{64,256,256b}/ (results.json,
# results.md, accuracy.png, model/). The length sweeps are separate
# commands (docs/RESULTS.md), since their cost grows with the square of the
# length.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs}
THREADS=${2:-1}
cargo build --release --quiet
BIN="$RUNS/selective-ih"
mkdir -p "$RUNS"
cp target/release/selective "$BIN"
for pos in rotary learned; do
    s1="$RUNS/ih-attn-$pos-64"
    s2="$RUNS/ih-attn-$pos-256"
    s3="$RUNS/ih-attn-$pos-256b"
    [ -f "$s1/results.json" ] || "$BIN" task induction-heads --layer attention --positions "$pos" \
        --max-positions 16384 --n-head 2 --d-model 32 --n-layer 2 --seq-len 64 --steps 6000 \
        --batch 32 --lr 1e-3 --stop-at-accuracy 1.0 --seed 1 --threads "$THREADS" --out "$s1"
    [ -f "$s2/results.json" ] || "$BIN" task induction-heads --init "$s1/model" --seq-len 256 \
        --d-model 32 --steps 3000 --batch 16 --lr 5e-4 --seed 2 --threads "$THREADS" --out "$s2"
    [ -f "$s3/results.json" ] || "$BIN" task induction-heads --init "$s2/model" --seq-len 256 \
        --d-model 32 --steps 3000 --batch 16 --lr 1e-3 --seed 3 --threads "$THREADS" --out "$s3"
done
