#!/usr/bin/env bash
# Prefill and decode speed of `selective` and llama.cpp on the same model,
# measured back to back in one run, so that the two can be compared as
# ratios (the machines this project runs on are noisy).
#
# usage: scripts/bench_vs_llama_cpp.sh MODEL_DIR GGUF_DIR LLAMA_BENCH [ROUNDS] [REPS] [THREADS]
#   MODEL_DIR    Hugging Face-layout model (e.g. `selective init --preset mamba-130m --out DIR`)
#   GGUF_DIR     the same model converted by scripts/bench_llama_cpp.sh:
#                NAME-{f32,f16,q8_0}.gguf, NAME the basename of MODEL_DIR
#                (e.g. mamba-130m-random, mamba2-130m-random)
#   LLAMA_BENCH  path of llama.cpp's llama-bench binary
# Rounds alternate the two programs; each prints prefill of 512 tokens
# (pp512) and decode of 128 tokens (tg128) as mean ± sd over REPS.
# Results (raw JSON and a markdown summary) go to bench-results/<date>/.
set -euo pipefail
model=${1:?MODEL_DIR}
gguf=${2:?GGUF_DIR}
llama=${3:?LLAMA_BENCH}
rounds=${4:-2}
reps=${5:-3}
threads=${6:-2}
name=$(basename "$model")
out=bench-results/$(date -u +%Y%m%dT%H%M%S)
mkdir -p "$out"
cargo build --release --quiet
sel=target/release/selective
for round in $(seq 1 "$rounds"); do
    echo "round $round: selective (load $(cut -d' ' -f1 /proc/loadavg))" >&2
    "$sel" bench --model "$model" -p 512 -n 128 --reps "$reps" --threads "$threads" \
        --dtype f32,bf16,f16,q8 --json > "$out/selective-$round.json"
    for t in f32 f16 q8_0; do
        echo "round $round: llama.cpp $t (load $(cut -d' ' -f1 /proc/loadavg))" >&2
        "$llama" -m "$gguf/$name-$t.gguf" -p 512 -n 128 -t "$threads" -r "$reps" \
            -o json > "$out/llama-$t-$round.json"
    done
done
python3 - "$out" "$rounds" <<'EOF' | tee "$out/summary.md"
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
rows = {}
for r in range(1, rounds + 1):
    for row in json.load(open(f"{out}/selective-{r}.json")):
        d = row["dtype"]
        rows.setdefault(("selective", d, "pp512"), []).append(row["prefill_tokens_per_second"])
        rows.setdefault(("selective", d, "tg128"), []).append(row["decode_tokens_per_second"])
        rows.setdefault(("bound", d, "tg128"), []).append(row["decode_bound_tokens_per_second"])
        rows.setdefault(("bandwidth", d, ""), []).append(row["read_bandwidth_gb_per_s"])
    for t in ["f32", "f16", "q8_0"]:
        for test in json.load(open(f"{out}/llama-{t}-{r}.json")):
            name = "pp512" if test["n_prompt"] > 0 else "tg128"
            rows.setdefault(("llama.cpp", t, name), []).append(test["avg_ts"])
med = {k: statistics.median(v) for k, v in rows.items()}
print(f"read bandwidth (median of rounds): {med[('bandwidth', 'f32', '')]:.1f} GB/s\n")
print("| program | weights | test | tok/s (median of rounds) | runs |")
print("|---|---|---|---|---|")
for k in sorted(rows):
    if k[0] in ("selective", "llama.cpp"):
        print(f"| {k[0]} | {k[1]} | {k[2]} | {med[k]:.1f} | {', '.join(f'{x:.1f}' for x in rows[k])} |")
print("\n| ratio | value |\n|---|---|")
ratios = [
    ("selective f32 tg / llama.cpp f32 tg", med[("selective", "f32", "tg128")] / med[("llama.cpp", "f32", "tg128")]),
    ("selective f32 tg / bandwidth bound", med[("selective", "f32", "tg128")] / med[("bound", "f32", "tg128")]),
    ("selective bf16 tg / llama.cpp f16 tg", med[("selective", "bf16", "tg128")] / med[("llama.cpp", "f16", "tg128")]),
    ("selective bf16 tg / bandwidth bound", med[("selective", "bf16", "tg128")] / med[("bound", "bf16", "tg128")]),
    ("selective f16 tg / llama.cpp f16 tg", med[("selective", "f16", "tg128")] / med[("llama.cpp", "f16", "tg128")]),
    ("selective q8 tg / llama.cpp q8_0 tg", med[("selective", "q8", "tg128")] / med[("llama.cpp", "q8_0", "tg128")]),
    ("selective q8 tg / bandwidth bound", med[("selective", "q8", "tg128")] / med[("bound", "q8", "tg128")]),
    ("selective f32 pp512 / llama.cpp f32 pp512", med[("selective", "f32", "pp512")] / med[("llama.cpp", "f32", "pp512")]),
]
for name, v in ratios:
    print(f"| {name} | {v:.2f} |")
EOF
