#!/usr/bin/env bash
# Fuzzes Spillway's parsers of untrusted input (the cargo-fuzz targets in fuzz/) for a time
# budget, then prints one line per target: executions, coverage, corpus size and crashes.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
#   SECONDS  total budget, split evenly over the targets (default 600)
#   TARGET   fuzz only these (default: every target `cargo fuzz list` shows)
# Needs the nightly toolchain (installed if missing) and cargo-fuzz 0.13.2 (installed through
# scripts/tools.sh, cached, unless `cargo fuzz` already is that version).
# Inputs: fuzz/seeds/<target> (committed, only read). Working corpus, where new inputs go:
# fuzz/corpus/<target>. Logs: fuzz/logs/<target>.log. Crashes: fuzz/artifacts/<target>/.
# All three are gitignored. Exits 1 if a target crashed or failed to build or run, printing
# the artifacts and how to reproduce them; see fuzz/README.md for turning one into a test.
# FUZZ_DEBUG_ASSERTIONS=1 also builds with debug assertions and overflow checks (`-a`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[fuzz] %s\n' "$*" >&2; }
usage() { echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2; }

total=${1:-600}
[[ $total =~ ^[0-9]+$ ]] || usage
(( total > 0 )) || usage
if [ $# -gt 0 ]; then shift; fi

# cargo-fuzz drives the build with -Zsanitizer=address, which needs nightly.
toolchains=$(rustup toolchain list)
if ! grep -q nightly <<<"$toolchains"; then
  log "no nightly toolchain (cargo-fuzz needs it); installing: rustup toolchain install nightly --profile minimal"
  rustup toolchain install nightly --profile minimal
fi

if [[ $(cargo fuzz --version 2>/dev/null || true) != *"cargo-fuzz 0.13.2"* ]]; then
  cargo_fuzz=$(scripts/tools.sh cargo-fuzz)
  PATH="$(dirname "$cargo_fuzz"):$PATH"
  export PATH
fi

flags=(-O)
if [ "${FUZZ_DEBUG_ASSERTIONS:-0}" = 1 ]; then flags+=(-a); fi
fuzz() { cargo +nightly fuzz "$1" "${flags[@]}" --fuzz-dir fuzz "${@:2}"; }

listed=$(cargo +nightly fuzz list --fuzz-dir fuzz)
if [ $# -gt 0 ]; then
  targets=("$@")
  for t in "${targets[@]}"; do
    grep -qx -- "$t" <<<"$listed" \
      || { log "unknown target '$t'; the targets are: $(tr '\n' ' ' <<<"$listed")"; exit 2; }
  done
else
  mapfile -t targets <<<"$listed"
fi

per=$(( total / ${#targets[@]} ))
(( per >= 1 )) || per=1

log "building the fuzz targets (cargo +nightly fuzz build ${flags[*]}); the first build takes a while"
fuzz build

mkdir -p fuzz/logs
marker=$(mktemp)
trap 'rm -f "$marker"' EXIT

# The last match of an extended regex in a file, or nothing.
last() { grep -oE "$1" "$2" | tail -n 1 || true; }

rows=()
failed=()
artifacts=()
for t in "${targets[@]}"; do
  log_file="fuzz/logs/$t.log"
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  touch "$marker"
  log "fuzzing $t for ${per}s (log: $log_file)"
  # The working corpus comes first: libFuzzer writes new inputs only to the first directory.
  if fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
      -max_total_time="$per" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
      >"$log_file" 2>&1; then
    rc=0
  else
    rc=$?
  fi

  execs=$(last 'stat::number_of_executed_units: [0-9]+' "$log_file")
  execs=${execs##* }
  cov_ft=$(last 'cov: [0-9]+ ft: [0-9]+' "$log_file")
  cov=$(awk '{print $2}' <<<"$cov_ft")
  ft=$(awk '{print $4}' <<<"$cov_ft")
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  mapfile -t crashes < <(find "fuzz/artifacts/$t" -type f -newer "$marker" \
    \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | sort)

  if [ "${#crashes[@]}" -gt 0 ]; then
    status=CRASH
    failed+=("$t")
  elif [ "$rc" -ne 0 ]; then
    status="FAILED($rc)"
    failed+=("$t")
  else
    status=ok
  fi
  rows+=("$(printf '%-12s %-10s %12s %8s %8s %8s %8s' \
    "$t" "$status" "${execs:--}" "${cov:--}" "${ft:--}" "$corpus" "${#crashes[@]}")")
  artifacts+=("${crashes[@]}")
done

echo
printf '%-12s %-10s %12s %8s %8s %8s %8s\n' target status executions cov ft corpus crashes
printf '%s\n' "${rows[@]}"

if [ "${#failed[@]}" -gt 0 ]; then
  echo
  for t in "${failed[@]}"; do echo "FAILED: $t (log: fuzz/logs/$t.log)"; done
  for a in "${artifacts[@]}"; do
    t=$(basename "$(dirname "$a")")
    echo "crash input: $a"
    echo "  reproduce: cargo +nightly fuzz run ${flags[*]} $t $a"
  done
  exit 1
fi
