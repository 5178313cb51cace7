#!/usr/bin/env bash
# Runs Spillway's whole test suite: unit and property tests, rdkafka MockCluster tests, and
# integration tests against Apache Kafka (KRaft, single node on loopback) and a real
# Confluent-compatible schema registry (rivven-schema), installing both on first use
# (scripts/tools.sh, cached under ~/.cache/spillway/tools).
#
# The runner is plain `cargo test`: each test binary starts one broker that its tests share
# (each test with its own topics and groups); tests that kill or restart a broker start their
# own, and crash and rebalance tests run with no other broker test beside them
# (tests/common/mod.rs). If a tool cannot be installed or started, the tests fail with the
# reason; nothing is skipped. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
kafka=$(scripts/tools.sh kafka)
rivven=$(scripts/tools.sh rivven-schema)
export SPILLWAY_RIVVEN_BIN="$rivven"
echo "[test] Apache Kafka:  $kafka" >&2
echo "[test] rivven-schema: $rivven" >&2

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?

# One summary for the whole run (cargo test prints one line per test binary; a binary that
# crashed prints none, only cargo's "error: test failed" line).
awk -v secs=$(( $(date +%s) - started )) '
  /^error: (doc)?test failed/ { crashed_or_failed++ }
  /^test result: / {
    binaries++
    for (i = 1; i <= NF; i++) {
      if ($(i+1) ~ /^passed/)   passed  += $i
      if ($(i+1) ~ /^failed/)   failed  += $i
      if ($(i+1) ~ /^ignored/)  ignored += $i
    }
  }
  END {
    printf "[test] summary: %d tests run: %d passed, %d failed, %d ignored, in %d test binaries (%d failed or crashed); wall time %d s\n",
      passed + failed, passed, failed, ignored, binaries, crashed_or_failed, secs
  }' "$log"
exit "$status"
