#!/usr/bin/env bash
# Runs Spillway's whole test suite against a real Kafka-protocol broker (tansu) and a real
# Confluent-compatible schema registry (rivven-schema), installing both on first use.
# Each integration test starts its own broker on a free loopback port, so tests never share
# topics or state. If a tool cannot be installed or started, the tests fail with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."

tansu=$(scripts/tools.sh tansu)
rivven=$(scripts/tools.sh rivven-schema)
export SPILLWAY_TANSU_BIN="$tansu" SPILLWAY_RIVVEN_BIN="$rivven"
echo "[test] tansu:         $tansu" >&2
echo "[test] rivven-schema: $rivven" >&2

if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --workspace --no-fail-fast "$@"
else
  echo "[test] cargo-nextest not found; using cargo test" >&2
  exec cargo test --workspace --no-fail-fast "$@"
fi
