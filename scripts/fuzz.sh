#!/usr/bin/env bash
# Runs one fuzz target for SECONDS, seeded with the real files of tests/conformance/.
#   scripts/fuzz.sh onnx_import|keras_json|npy|idx SECONDS
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Crashes land
# in fuzz/artifacts/TARGET/; the last lines report executions and time.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?target: onnx_import, keras_json, npy or idx}
secs=${2:?seconds}
corpus="fuzz/corpus/$target"
mkdir -p "$corpus"
if [ -z "$(ls -A "$corpus")" ]; then
  scripts/fuzz-seeds.sh "$target" "$corpus"
fi
cd fuzz
cargo +nightly fuzz run "$target" "corpus/$target" -- \
  -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -max_len=1048576 -print_final_stats=1
