#!/usr/bin/env bash
# The crate and module rules of README's "Architecture" section, checked (CI runs this;
# so can anyone: `scripts/check-layout.sh`). Exit 1 naming each rule broken and where.
#
#  1. README's crate table says what each crate depends on: its "depends on" column is
#     compared with `cargo tree -e normal --depth 1` (default features), both ways.
#  2. Among the workspace crates: `ir` depends on none; `autodiff` and `backends` on `ir`
#     only (so `backends` never on `autodiff` or the frontends).
#  3. `prost` is a dependency of `ir` only (`cargo tree -i prost`); no other crate's
#     source names it.
#  4. No `cpu::` path outside `backends/src/cpu/` in `ir`, `autodiff` and `backends`
#     (the neutral passes in `backends/src/passes/` import nothing from a backend).
#  5. The recurrent ops' meaning (`Act`, `Cell`, `Spec`, `parse_activations`,
#     `GradSlots`) is defined in `ir/src/ops/rnn.rs` only, not again in `ir`, `autodiff`
#     or `backends` (the Keras frontend's `Cell` is a Keras layer cell, another thing).
#  6. `matrixmultiply::` appears in `backends/src/gemm.rs` only.
#  7. In the frontends, the CPU backend is named (`cpu::`, `CpuBackend`, `CpuPlan`) only in
#     the files listed below. This is a ratchet, not yet the goal: until the frontends
#     choose a backend by name (issue 25, item 5), a new file that names the CPU backend
#     fails here; the list only shrinks.
set -uo pipefail
cd "$(dirname "$0")/.."
fail=0
bad() {
  echo "layout: $*"
  fail=1
}
# Lines of Rust source that are code, not comments: "path:line:text".
code_grep() {
  local pattern=$1
  shift
  grep -rnE --include='*.rs' "$pattern" "$@" 2>/dev/null | grep -vE '^[^:]+:[0-9]+:[[:space:]]*//'
}

# 1 and 2: dependencies.
declare -A crate_of=([ir]=cellgraph-ir [autodiff]=cellgraph-autodiff [backends]=cellgraph-backends
  [cellgraph]=cellgraph)
# `cargo tree` is run with --locked: a Cargo.toml change the lock file does not have
# yet is reported as that, not guessed around.
tree() {
  local out
  if ! out=$(cargo tree --locked -e normal --prefix none "$@" 2>&1); then
    # The caller reports this text (a subshell cannot set `fail`).
    echo "cargo tree $* failed: $(tail -n 3 <<<"$out" | tr '\n' ' ')"
    return 1
  fi
  tail -n +2 <<<"$out" | awk '{print $1}' | sort -u
}
deps_of() { tree --depth 1 -p "$1"; }
rows=$(grep -E '^\| `cellgraph[a-z-]*` \(`[a-z]+/`\) \|' README.md)
if [ -z "$rows" ]; then
  bad "README.md has no crate table rows (| \`crate\` (\`folder/\`) | owns | depends on |)"
fi
while IFS= read -r row; do
  [ -z "$row" ] && continue
  crate=$(sed -E 's/^\| `([a-z-]+)`.*/\1/' <<<"$row")
  # The last column; a parenthesis (an optional feature) is not a default dependency.
  listed=$(awk -F'|' '{print $(NF-1)}' <<<"$row" | sed -E 's/\([^)]*\)//g' | tr ',' '\n' |
    sed -E 's/^[[:space:]]+|[[:space:]]+$//g' | grep -v '^$' |
    while read -r d; do echo "${crate_of[$d]:-$d}"; done | sort -u)
  actual=$(deps_of "$crate") || {
    bad "$actual"
    continue
  }
  if [ -z "$actual" ]; then
    bad "cargo tree gave no dependencies for $crate (is the README row's crate name right?)"
    continue
  fi
  missing=$(comm -13 <(echo "$listed") <(echo "$actual") | tr '\n' ' ')
  extra=$(comm -23 <(echo "$listed") <(echo "$actual") | tr '\n' ' ')
  [ -n "${missing// /}" ] && bad "$crate depends on $missing but README's table does not say so"
  [ -n "${extra// /}" ] && bad "README's table says $crate depends on $extra; it does not"
  case $crate in
    cellgraph-ir) allowed="" ;;
    cellgraph-autodiff | cellgraph-backends) allowed="cellgraph-ir" ;;
    *) allowed="*" ;;
  esac
  if [ "$allowed" != "*" ]; then
    for d in $(grep '^cellgraph' <<<"$actual"); do
      [ "$d" = "$allowed" ] || bad "$crate depends on $d (allowed among the workspace crates: ${allowed:-none})"
    done
  fi
done <<<"$rows"

# 3: prost.
if users=$(tree -i prost --depth 1); then
  users=$(tr '\n' ' ' <<<"$users")
  [ "$users" = "cellgraph-ir " ] || bad "prost is a dependency of: ${users:-nothing?} (allowed: cellgraph-ir)"
else
  bad "$users"
fi
hits=$(code_grep '\bprost::|use prost\b' autodiff backends frontends tests/src tests/tests)
[ -n "$hits" ] && bad "prost named outside ir:"$'\n'"$hits"

# 4: cpu:: outside the CPU backend.
hits=$(code_grep '\bcpu::' ir/src autodiff/src backends/src | grep -v '^backends/src/cpu/')
[ -n "$hits" ] && bad "\`cpu::\` outside backends/src/cpu/:"$'\n'"$hits"

# 5: the recurrent ops' meaning is defined once, in ir.
hits=$(code_grep '^\s*pub (enum|struct|fn) (Act|Cell|Spec|GradSlots|parse_activations)\b' \
  ir/src autodiff/src backends/src | grep -v '^ir/src/ops/rnn.rs:')
[ -n "$hits" ] && bad "a recurrent-op definition outside ir/src/ops/rnn.rs:"$'\n'"$hits"

# 6: one GEMM entry point.
hits=$(code_grep 'matrixmultiply::' backends/src | grep -v '^backends/src/gemm.rs:')
[ -n "$hits" ] && bad "matrixmultiply:: outside backends/src/gemm.rs:"$'\n'"$hits"

# 7: the frontends name the CPU backend only where they do today (a ratchet).
allowed_cpu="frontends/src/bench.rs frontends/src/cli.rs frontends/src/conformance.rs
frontends/src/keras/model/plan.rs"
for f in $(code_grep '\bcpu::|\bCpuBackend\b|\bCpuPlan\b' frontends/src | cut -d: -f1 | sort -u); do
  grep -qx "$f" <<<"$(tr ' ' '\n' <<<"$allowed_cpu")" ||
    bad "$f names the CPU backend; the frontends may do so only in: $(echo $allowed_cpu)"
done

if [ "$fail" -eq 0 ]; then
  echo "layout: README's crate table, crate edges, prost, cpu:: imports, the recurrent ops' home, the GEMM entry point and the frontends' CPU ratchet all hold"
fi
exit "$fail"
