#!/usr/bin/env bash
# CI's fuzz smoke: builds the four libFuzzer targets of fuzz/ with the stable toolchain
# (SanitizerCoverage instrumentation as `cargo fuzz --sanitizer none` adds it; no
# nightly, no AddressSanitizer) and runs each for SECONDS (default 60) on the seeds of
# the shipped files, two at a time. Exit 1 when a target crashes, leaks past the RSS
# limit or times out on an input; the input is left in target/fuzz-smoke/artifacts/.
#   scripts/fuzz-smoke.sh [SECONDS]
# The long runs with AddressSanitizer are scripts/fuzz.sh (nightly + cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
root=$PWD
host=$(rustc -vV | sed -n 's/^host: //p')
out="$root/target/fuzz-smoke"
rm -rf "$out/corpus" "$out/artifacts" "$out/logs"
mkdir -p "$out/corpus" "$out/artifacts" "$out/logs"
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags="$flags -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
flags="$flags -Cllvm-args=-sanitizer-coverage-pc-table"
flags="$flags -Cllvm-args=-sanitizer-coverage-trace-compares"
flags="$flags --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
echo "== building the fuzz targets ($host)"
(cd fuzz && RUSTFLAGS="$flags" CARGO_TARGET_DIR="$root/target/fuzz" \
  cargo build --locked --release --bins --target "$host")
bin="$root/target/fuzz/$host/release"
targets=(onnx_import keras_json npy idx)
run() {
  local t=$1
  scripts/fuzz-seeds.sh "$t" "$out/corpus/$t"
  mkdir -p "$out/artifacts/$t"
  "$bin/$t" "$out/corpus/$t" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 \
    -max_len=1048576 -print_final_stats=1 -artifact_prefix="$out/artifacts/$t/" \
    > "$out/logs/$t.log" 2>&1
}
status=0
for pair in "0 1" "2 3"; do
  pids=()
  for i in $pair; do
    run "${targets[$i]}" & pids+=($!)
  done
  for k in "${!pids[@]}"; do
    i=$(echo "$pair" | cut -d' ' -f$((k + 1)))
    t=${targets[$i]}
    if wait "${pids[$k]}"; then
      runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/logs/$t.log")
      echo "fuzz $t: ${secs}s, ${runs:-?} executions, no finding"
    else
      status=1
      echo "fuzz $t: FAILED (log: target/fuzz-smoke/logs/$t.log)"
      tail -40 "$out/logs/$t.log"
      ls -l "$out/artifacts/$t"
    fi
  done
done
exit "$status"
