#!/usr/bin/env bash
# Fills DIR with the seed inputs of one fuzz target, taken from the shipped files:
#   scripts/fuzz-seeds.sh onnx_import|keras_json|npy|idx DIR
# Used by scripts/fuzz.sh (long runs) and scripts/fuzz-smoke.sh (CI).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?target: onnx_import, keras_json, npy or idx}
dir=${2:?seed folder}
mkdir -p "$dir"
seed() { cp "$1" "$dir/$(echo "$1" | md5sum | cut -c1-16)"; }
case "$target" in
  onnx_import) find tests/conformance -name model.onnx | sort | while read -r f; do seed "$f"; done ;;
  keras_json) find tests/conformance -name 'model*.json' | sort | while read -r f; do seed "$f"; done ;;
  npy) find tests/conformance -name '*.npy' -size -64k | sort | while read -r f; do seed "$f"; done ;;
  idx) for f in frontends/data/mnist-10k/*labels*.gz; do cp "$f" "$dir/"; gunzip -c "$f" > "$dir/$(basename "$f" .gz)"; done
       printf '\x00\x00\x08\x03\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00\x02\x01\x02\x03\x04' > "$dir/tiny3" ;;
  *) echo "unknown target $target" >&2; exit 2 ;;
esac
