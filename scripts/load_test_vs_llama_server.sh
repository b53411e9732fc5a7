#!/usr/bin/env bash
# Serving throughput of `selective serve` and llama.cpp's `llama-server` on the
# same model, under the same load (scripts/load_test.py: streaming
# /v1/completions from 1, 4, 16, 64 concurrent clients).
#
# usage: scripts/load_test_vs_llama_server.sh SELECTIVE MODEL_DIR GGUF LLAMA_SERVER [THREADS] [LOAD_TEST_ARGS...]
#   SELECTIVE     our binary, e.g. target/release/selective
#   MODEL_DIR     Hugging Face-layout model with tokenizer.json
#                 (e.g. /work/bench-models/mamba-130m-random)
#   GGUF          the same model for llama.cpp (e.g. .../mamba-130m-random-f32.gguf)
#   LLAMA_SERVER  path of llama.cpp's llama-server binary
#   THREADS       compute threads for both servers (default 2)
#   LOAD_TEST_ARGS passed on to load_test.py (e.g. --requests-per-client 4)
# environment: CONCURRENCY (1,4,16,64), MAX_TOKENS (64), PARALLEL (64 slots),
#   DTYPE (f32, for selective), PORT (18181; llama-server gets PORT+1),
#   TIMEOUT (600 s per server for the load test).
# The two servers run one at a time, never together (the machine has few
# cores; anything else running, a build say, spoils the numbers, and
# llama.cpp's spinning threads suffer most from it).  Each is started, waited
# for until GET /health answers 200, load-tested and killed.  Prints both
# tables, the ratio selective/llama-server of aggregate tokens/s at each
# concurrency, and selective's tok/s at 16 clients over its tok/s at 1.
# Logs, tables and JSON go to bench-results/serve-<date>/.
set -euo pipefail
sel=${1:?SELECTIVE}
model=${2:?MODEL_DIR}
gguf=${3:?GGUF}
llama=${4:?LLAMA_SERVER}
threads=${5:-2}
shift $(( $# < 5 ? $# : 5 ))
extra=("$@")
conc=${CONCURRENCY:-1,4,16,64}
max_tokens=${MAX_TOKENS:-64}
parallel=${PARALLEL:-64}
dtype=${DTYPE:-f32}
port=${PORT:-18181}
timeout=${TIMEOUT:-600}
# llama-server splits -c evenly over its slots; give each slot room for a
# prompt (load_test.py's default is about 70 tokens) and the completion.
ctx=$(( parallel * (256 + max_tokens) ))
here=$(dirname "$0")
out=bench-results/serve-$(date -u +%Y%m%dT%H%M%S)
mkdir -p "$out"

pid=
stop() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; fi; }
trap stop EXIT

# run NAME PORT COMMAND...: start a server, wait for /health, load-test it, stop it
run() {
    local name=$1 p=$2; shift 2
    echo "starting $name (load $(cut -d' ' -f1 /proc/loadavg)): $*" >&2
    "$@" > "$out/$name.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 300); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$p/health")" = 200 ] && break
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$name exited before it was ready; $out/$name.log:" >&2
            tail -5 "$out/$name.log" >&2
            stop
            return 0
        fi
        sleep 1
    done
    python3 "$here/load_test.py" --url "http://127.0.0.1:$p" --concurrency "$conc" \
        --max-tokens "$max_tokens" --timeout "$timeout" --label "$name" \
        --json "$out/$name.json" "${extra[@]}" | tee "$out/$name.md" || true
    echo
    stop
}

run selective "$port" "$sel" serve --model "$model" --host 127.0.0.1 --port "$port" \
    --parallel "$parallel" --dtype "$dtype" --threads "$threads"
run llama-server $((port + 1)) "$llama" -m "$gguf" --host 127.0.0.1 --port $((port + 1)) \
    --parallel "$parallel" -t "$threads" -c "$ctx"

python3 - "$out" <<'EOF2' | tee "$out/summary.md"
import json, sys
out = sys.argv[1]
def load(name):
    try:
        return {lv["concurrency"]: lv for lv in json.load(open(f"{out}/{name}.json"))["levels"]}
    except FileNotFoundError:
        return {}
ours, theirs = load("selective"), load("llama-server")
print("| concurrency | selective tok/s | llama-server tok/s | ratio selective/llama-server |")
print("|---|---|---|---|")
for c in sorted(set(ours) | set(theirs)):
    a = ours.get(c, {}).get("tokens_per_s")
    b = theirs.get(c, {}).get("tokens_per_s")
    r = f"{a / b:.2f}" if a and b else "-"
    print(f"| {c} | {a if a is not None else '-'} | {b if b is not None else '-'} | {r} |")
a16, a1 = ours.get(16, {}).get("tokens_per_s"), ours.get(1, {}).get("tokens_per_s")
print(f"\nselective tok/s at 16 clients / at 1 client: {a16 / a1:.2f}" if a16 and a1
      else "\nselective tok/s at 16 / at 1: - (a level is missing)")
EOF2
