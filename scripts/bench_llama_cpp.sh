#!/usr/bin/env bash
# bench_llama_cpp.sh -- measure the peer implementation (llama.cpp, CPU) on a
# Hugging Face-layout Mamba checkpoint, so that `selective`'s own benchmark can
# be reported as ratios against it on the same machine.
#
# Usage:
#   scripts/bench_llama_cpp.sh MODEL_DIR WORK_DIR
#
#   MODEL_DIR  HF layout: config.json, model.safetensors, tokenizer.json
#              (e.g. /work/bench-models/mamba-130m-random). It is never modified.
#   WORK_DIR   scratch dir for the llama.cpp sources, build, GGUFs and results
#              (e.g. /work/llama). Re-running reuses whatever is already there.
#
# Environment knobs (defaults in brackets):
#   LLAMA_CPP_PYTHON_VERSION [0.3.36]  PyPI sdist that vendors llama.cpp
#                                      (0.3.36 vendors ggml-org/llama.cpp@0c1e570)
#   GGUF_DIR   [$WORK_DIR/gguf]        where the converted GGUFs go
#   TYPES      ["f32 f16 q8_0"]        --outtype values for convert_hf_to_gguf.py
#   THREADS    [2]   PP [512]   TG [128]   REPS [3]   JOBS [2] (build parallelism)
#   MAX_LOAD   [0.5] wait (up to WAIT_MAX s, default 1800) until the 1-minute
#                    load average is below this before benchmarking
#
# Only PyPI is needed (no GitHub / Hugging Face access): the llama-cpp-python
# sdist vendors llama.cpp incl. convert_hf_to_gguf.py and gguf-py.
#
# Output: one llama-bench JSON file per type in $WORK_DIR/results/, and a
# combined JSON summary on stdout (progress/logs go to stderr).
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 MODEL_DIR WORK_DIR" >&2
    exit 2
fi
MODEL_DIR=$(realpath "$1")
mkdir -p "$2"
WORK_DIR=$(realpath "$2")

VER=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
GGUF_DIR=${GGUF_DIR:-$WORK_DIR/gguf}
TYPES=${TYPES:-"f32 f16 q8_0"}
THREADS=${THREADS:-2}
PP=${PP:-512}
TG=${TG:-128}
REPS=${REPS:-3}
JOBS=${JOBS:-2}
MAX_LOAD=${MAX_LOAD:-0.5}
WAIT_MAX=${WAIT_MAX:-1800}
PY=${PYTHON:-python3}

log() { echo "[bench_llama_cpp] $*" >&2; }

# ---------------------------------------------------------------------------
# 1. Sources: the llama-cpp-python sdist from PyPI.
#    NB: use `--no-binary llama-cpp-python`, not `--no-binary :all:`; the latter
#    also forces the *build* dependencies (cmake!) to be built from source just
#    to prepare metadata.
# ---------------------------------------------------------------------------
SDIST_DIR=$WORK_DIR/llama_cpp_python-$VER
if [[ ! -d $SDIST_DIR ]]; then
    log "downloading llama-cpp-python==$VER sdist"
    "$PY" -m pip download "llama-cpp-python==$VER" --no-deps \
        --no-binary llama-cpp-python -d "$WORK_DIR" >&2
    tar -xzf "$WORK_DIR/llama_cpp_python-$VER.tar.gz" -C "$WORK_DIR"
fi
# Always use the real path: vendor/llama.cpp/.git is a gitdir file pointing to
# ../../.git/modules/...; reaching it through a symlink makes cmake record
# non-existent dependencies and ninja then loops ("manifest still dirty").
LLAMA_SRC=$SDIST_DIR/vendor/llama.cpp
[[ -f $LLAMA_SRC/convert_hf_to_gguf.py ]] || { log "no vendored llama.cpp in $SDIST_DIR"; exit 1; }

# ---------------------------------------------------------------------------
# 1b. Work around a GCC<13 miscompile of ggml's AMX tile setup.
#     GCC 12's _tile_loadconfig() is an asm with an "m"(*(const void **)p)
#     operand, i.e. it claims to read only 8 bytes, so the stores of the
#     rows[]/colsb[] fields of the 64-byte tile config are eliminated as dead.
#     On AMX machines (Sapphire/Emerald Rapids, -march=native) llama-bench then
#     dies with SIGILL at the first `tileloadd` (quantized prefill, q8_0 pp512).
#     A compiler barrier that lets &tc escape keeps the stores. Harmless with
#     other compilers; does not change what ggml computes.
# ---------------------------------------------------------------------------
MMQ=$LLAMA_SRC/ggml/src/ggml-cpu/amx/mmq.cpp
if [[ -f $MMQ ]] && ! grep -q 'selective bench: GCC<13' "$MMQ"; then
    log "patching $MMQ (GCC<13 _tile_loadconfig workaround)"
    sed -i 's|^    _tile_loadconfig(&tc);|    __asm__ __volatile__("" : : "r"(\&tc) : "memory"); // selective bench: GCC<13 _tile_loadconfig only declares 8 bytes read\n    _tile_loadconfig(\&tc);|' "$MMQ"
    grep -q 'selective bench: GCC<13' "$MMQ" || log "WARNING: AMX patch did not apply (source changed?)"
fi

# ---------------------------------------------------------------------------
# 2. Build llama-bench (+ llama-quantize): Release, CPU only, -march=native,
#    no networking (LLAMA_CURL is deprecated/ignored in this version; the
#    HTTPS/OpenSSL option is LLAMA_OPENSSL), no tests/examples/server.
# ---------------------------------------------------------------------------
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
    log "installing cmake + ninja from PyPI"
    "$PY" -m pip install cmake ninja >&2
fi
BUILD=$WORK_DIR/build
BENCH=$BUILD/bin/llama-bench
if [[ ! -x $BENCH || $MMQ -nt $BENCH ]]; then
    log "configuring + building llama.cpp (-j$JOBS; ~15 min on 2 busy cores)"
    cmake -S "$LLAMA_SRC" -B "$BUILD" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON \
        -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF >&2
    cmake --build "$BUILD" -j"$JOBS" --target llama-bench llama-quantize >&2
fi
"$BENCH" --version >&2 || true

# ---------------------------------------------------------------------------
# 3. Convert HF -> GGUF. convert_hf_to_gguf.py needs torch, numpy, safetensors,
#    transformers (for the tokenizer) and the vendored gguf-py (via PYTHONPATH,
#    so it matches the C++ side exactly). For a Mamba config + tokenizer.json
#    (GPT-NeoX-20B) no tokenizer_config.json / special_tokens_map.json is
#    needed; the converter is pointed at a *copy* directory anyway (symlinks to
#    the big files) so the source model dir is never written to.
# ---------------------------------------------------------------------------
for mod in numpy torch safetensors transformers; do
    "$PY" -c "import $mod" 2>/dev/null || { log "pip install $mod"; "$PY" -m pip install "$mod" >&2; }
done
SRC_COPY=$WORK_DIR/$(basename "$MODEL_DIR")-gguf-src
mkdir -p "$SRC_COPY" "$GGUF_DIR"
for f in "$MODEL_DIR"/*; do
    case $(basename "$f") in
        *.safetensors|*.bin) ln -sfn "$f" "$SRC_COPY/" ;;   # big: symlink
        *) cp -f "$f" "$SRC_COPY/" ;;                       # small: copy
    esac
done
NAME=$(basename "$MODEL_DIR")
for t in $TYPES; do
    out=$GGUF_DIR/$NAME-$t.gguf
    if [[ ! -s $out ]]; then
        log "converting -> $out"
        PYTHONPATH=$LLAMA_SRC/gguf-py "$PY" "$LLAMA_SRC/convert_hf_to_gguf.py" \
            "$SRC_COPY" --outtype "$t" --outfile "$out" > "$WORK_DIR/convert-$t.log" 2>&1 \
            || { log "conversion to $t failed, see $WORK_DIR/convert-$t.log"; exit 1; }
    fi
done
# (q8_0 from the converter keeps 1-D tensors, conv1d and ssm_dt.weight
#  (48 cols, not a multiple of 32) in F32/F16; everything else Q8_0.)

# ---------------------------------------------------------------------------
# 4. Benchmark. Wait for an (almost) idle machine: with 2 threads on 2 cores,
#    any competing process wrecks llama.cpp's spin-waiting threadpool.
# ---------------------------------------------------------------------------
waited=0
while :; do
    load=$(cut -d' ' -f1 /proc/loadavg)
    if awk -v l="$load" -v m="$MAX_LOAD" 'BEGIN{exit !(l < m)}'; then break; fi
    if (( waited >= WAIT_MAX )); then log "load still $load after ${waited}s; benchmarking anyway"; break; fi
    log "load average $load >= $MAX_LOAD, waiting 30 s"
    sleep 30; waited=$((waited + 30))
done
RES=$WORK_DIR/results
mkdir -p "$RES"
log "load before benchmark: $(cat /proc/loadavg)"
for t in $TYPES; do
    m=$GGUF_DIR/$NAME-$t.gguf
    log "llama-bench $t: -p $PP -n $TG -t $THREADS -r $REPS"
    "$BENCH" -m "$m" -p "$PP" -n "$TG" -t "$THREADS" -r "$REPS" -o json > "$RES/$t-t$THREADS.json"
done
log "load after benchmark: $(cat /proc/loadavg)"

# Combined summary: tok/s mean and sd per (type, test).
"$PY" - "$RES" "$THREADS" $TYPES <<'EOF'
import json, sys, os
res, threads, types = sys.argv[1], sys.argv[2], sys.argv[3:]
out = {"load_after": open("/proc/loadavg").read().split()[:3], "results": []}
for t in types:
    for r in json.load(open(os.path.join(res, f"{t}-t{threads}.json"))):
        test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        out["results"].append({
            "type": t, "test": test, "threads": r["n_threads"],
            "avg_ts": round(r["avg_ts"], 2), "stddev_ts": round(r["stddev_ts"], 2),
            "build_commit": r.get("build_commit"), "build_number": r.get("build_number"),
            "cpu_info": r.get("cpu_info"), "model_type": r.get("model_type"),
        })
print(json.dumps(out, indent=2))
EOF
