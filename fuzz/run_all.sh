#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60) seconds, one after
# another, from fuzz/corpus/<target> (write it first: `cargo run --release
# --example make_seeds`), and prints a Markdown table of the runs. Logs go
# to fuzz/target/fuzz-logs/<target>.log; crash, timeout and OOM inputs to
# fuzz/artifacts/<target>/ (cargo-fuzz's default). Extra arguments go to
# libFuzzer. Exits non-zero if any target found something.
set -u
cd "$(dirname "$0")"
SECONDS_PER_TARGET="${SECONDS_PER_TARGET:-${1:-60}}"
shift $(( $# > 0 ? 1 : 0 ))
# The same codegen as /work/main/.cargo/config.toml gives the library (a
# RUSTFLAGS variable replaces that file's rustflags; cargo-fuzz appends it).
export RUSTFLAGS="${RUSTFLAGS:--Ctarget-cpu=native -Ctarget-feature=-prefer-256-bit}"
logs=target/fuzz-logs
mkdir -p "$logs"
cargo fuzz build --sanitizer none || exit 2
status=0
echo "| target | seconds | executions | exec/s | coverage (cov) | corpus | crashes | timeouts | OOMs |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for target in $(cargo fuzz list); do
    log="$logs/$target.log"
    start=$(date +%s.%N)
    cargo fuzz run --sanitizer none "$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 "$@" >"$log" 2>&1
    rc=$?
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    # libFuzzer's "Done N runs in S second(s)" only comes when the time
    # runs out; a run stopped by a crash has the wall time of the run.
    secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
    secs=${secs:-$(printf '%.0f' "$wall")}
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    corp=$(grep -o 'corp: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    crashes=$(grep -c '^==[0-9]*== ERROR: libFuzzer: deadly signal' "$log")
    timeouts=$(grep -c 'ERROR: libFuzzer: timeout' "$log")
    ooms=$(grep -c 'ERROR: libFuzzer: out-of-memory' "$log")
    execs=${execs:-0}
    rate=$(( secs > 0 ? execs / secs : execs ))
    [ "$rc" -ne 0 ] && status=1
    echo "| $target | $secs | $execs | $rate | ${cov:-?} | ${corp:-?} | $crashes | $timeouts | $ooms |"
done
exit $status
