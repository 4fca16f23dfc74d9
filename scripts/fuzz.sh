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
  case "$target" in
    onnx_import) find tests/conformance -name model.onnx | while read -r f; do cp "$f" "$corpus/$(echo "$f" | md5sum | cut -c1-16)"; done ;;
    keras_json) find tests/conformance -name 'model*.json' | while read -r f; do cp "$f" "$corpus/$(echo "$f" | md5sum | cut -c1-16)"; done ;;
    npy) find tests/conformance -name '*.npy' -size -64k | while read -r f; do cp "$f" "$corpus/$(echo "$f" | md5sum | cut -c1-16)"; done ;;
    idx) for f in frontends/data/mnist-10k/*labels*.gz; do cp "$f" "$corpus/"; gunzip -c "$f" > "$corpus/$(basename "$f" .gz)"; done
         printf '\x00\x00\x08\x03\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00\x02\x01\x02\x03\x04' > "$corpus/tiny3" ;;
    *) echo "unknown target $target" >&2; exit 2 ;;
  esac
fi
cd fuzz
cargo +nightly fuzz run "$target" "corpus/$target" -- \
  -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -max_len=1048576 -print_final_stats=1
