#!/usr/bin/env bash
# The README's run command: a local broker, the LLM provider simulator, a demo webhook
# receiver, the processor with config/example.toml (LLM classification, then the webhook),
# and a burst of demo events flowing through. Prints what /metrics
# shows, then stops everything cleanly (SIGTERM; the processor drains and commits).
# EVENTS (default 2000) sets the burst size. Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS="${EVENTS:-2000}"
PORT="${BROKER_PORT:-19092}"
export BROKER_PORT="$PORT"
RUN=.spillway/run; mkdir -p "$RUN"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  scripts/broker.sh stop || true
}
trap cleanup EXIT

echo "== building (release)"
cargo build --release --quiet --bin spillway -p spillway --bin demo -p spillway-load-tests
scripts/broker.sh start

echo "== LLM provider simulator on 127.0.0.1:8089 (3,000 RPM, 200 ms latency)"
target/release/spillway mock-llm --listen 127.0.0.1:8089 --rpm 3000 --latency-ms 200 \
  --latency-jitter-ms 100 >"$RUN/mock-llm.log" 2>&1 & pids+=($!)

echo "== demo webhook receiver on 127.0.0.1:8090 (the example config's sink)"
target/release/demo sink --addr 127.0.0.1:8090 >"$RUN/sink.log" 2>&1 & pids+=($!)

echo "== processor: config/example.toml with SPILLWAY_KAFKA__BROKERS=127.0.0.1:$PORT"
SPILLWAY_KAFKA__BROKERS="127.0.0.1:$PORT" target/release/spillway processor --config config/example.toml \
  >"$RUN/processor.log" 2>&1 & proc=$!; pids+=($proc)
for _ in $(seq 1 300); do
  curl -fs http://127.0.0.1:9464/readyz >/dev/null 2>&1 && break
  kill -0 "$proc" 2>/dev/null || { echo "processor exited:"; tail -30 "$RUN/processor.log"; exit 1; }
  sleep 0.1
done

echo "== producing $EVENTS events over 200 keys to spillway.events"
target/release/demo produce --brokers "127.0.0.1:$PORT" --topic spillway.events --count "$EVENTS" --keys 200

echo "== waiting for them to finish (watching http://127.0.0.1:9464/metrics)"
done_count=0
for _ in $(seq 1 600); do
  done_count=$(curl -fs http://127.0.0.1:9464/metrics | awk '/^spillway_events_total/ {s+=$2} END {print s+0}')
  [ "$done_count" -ge "$EVENTS" ] && break
  sleep 0.2
done
echo "== $done_count events finished; a few series from /metrics:"
curl -fs http://127.0.0.1:9464/metrics | grep -E '^spillway_(events_total|consumer_lag|committed_offset_lag|inflight_events|paused_partitions|offset_commits_total|step_duration_seconds_count|llm_tokens_total|llm_cost_usd_total|llm_breaker_state|event_llm_tokens_(sum|count)|event_llm_cost_usd_(sum|count))' | head -40
echo "== the simulator saw: $(curl -fs http://127.0.0.1:8089/stats | head -c 300)"
for _ in $(seq 1 30); do  # the receiver reports once a second
  tail -1 "$RUN/sink.log" | grep -q "^$EVENTS posts" && break
  sleep 0.2
done
echo "== the receiver got: $(tail -1 "$RUN/sink.log")"

echo "== SIGTERM: the processor drains, commits and leaves the group"
kill -TERM "$proc"; wait "$proc"; echo "processor exited with $?"
tail -3 "$RUN/processor.log"
