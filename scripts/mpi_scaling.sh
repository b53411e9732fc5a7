#!/usr/bin/env bash
# Data-parallel training on one machine (docs/DISTRIBUTED.md): one process
# with 2 threads against `mpirun -np 2` with 1 thread per rank, on
# char-small (d_model 256, 4 layers) and on a model of about 20M parameters
# (d_model 512, 12 layers), Tiny Shakespeare, byte-level, 2 micro-batches of
# 8 windows of 256 tokens a step (the same bits both ways). Reports
# training tokens/s and, for the ranks, the share of the step spent in the
# all-reduce (communication_seconds / step_seconds in metrics.jsonl; it
# includes waiting for the slower rank).
#
#   scripts/mpi_scaling.sh [BINARY] [STEPS]
# BINARY must be built with `cargo build --release --features mpi`.
set -euo pipefail
BIN=${1:-target/release/selective}
STEPS=${2:-12}
DATA=data/tinyshakespeare.txt
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
lscpu | grep -E "^Model name|^CPU\(s\)" | sed 's/  */ /g'

common=(--data "$DATA" --batch-size 8 --grad-accum 2 --seq-len 256 --steps "$STEPS"
        --eval-every 0 --eval-batches 1 --save-every 0 --log-every 1000)
summary() { # RUN_DIR LABEL
    python3 - "$1" "$2" "$STEPS" <<'PY'
import json, sys
run, label, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if '"loss"' in l]
rows = rows[2:]  # the first steps warm the allocator and caches
tokens = rows[-1]["tokens"] - rows[0]["tokens"]
seconds = rows[-1]["elapsed_seconds"] - rows[0]["elapsed_seconds"]
line = f"{label:32s} {tokens / seconds:8.0f} tok/s"
if "communication_seconds" in rows[0]:
    comm = sum(r["communication_seconds"] for r in rows[1:])
    step = sum(r["step_seconds"] for r in rows[1:])
    line += f"   all-reduce {100 * comm / step:4.1f}% of the step"
print(line, f"(steps {rows[0]['step'] + 1}-{rows[-1]['step']}, last loss {rows[-1]['loss']:.4f})")
PY
}
for model in "char-small:256:4" "20M:512:12"; do
    IFS=: read -r name d layers <<<"$model"
    args=("${common[@]}" --d-model "$d" --n-layer "$layers")
    "$BIN" train --out "$OUT/$name-1x2" "${args[@]}" --threads 2 2>"$OUT/$name.log"
    mpirun -np 2 --bind-to core "$BIN" train --out "$OUT/$name-2x1" "${args[@]}" --threads 1 2>/dev/null
    echo "$name: $(grep -o '[0-9]* parameters' "$OUT/$name.log")"
    summary "$OUT/$name-1x2" "  1 rank x 2 threads"
    summary "$OUT/$name-2x1" "  2 ranks x 1 thread (MPI)"
    cmp -s "$OUT/$name-1x2/model/model.safetensors" "$OUT/$name-2x1/model/model.safetensors" \
        && echo "  final weights: identical" || echo "  final weights: DIFFER"
done
