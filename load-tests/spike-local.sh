#!/usr/bin/env bash
# The spike load test against local processes: a fresh Apache Kafka (scripts/broker.sh), a
# schema registry, the provider simulator (3,000 RPM, 200 ms), the ingress
# (load-tests/config/spike-ingress.toml: sources blog and campaign) and the processor
# (load-tests/config/spike-processor.toml: classify, then the transactional result topic).
# Then `load-test` drives a steady source at STEADY_RATE (default 2) events/s for DURATION
# (default 240) s and a spike of SPIKE_EVENTS (default 10000) from the other source, and
# prints the verdict; its exit code is this script's. FAIRNESS (default source) sets the
# processor's processor.fairness.by; FAIRNESS=none runs the same profile first come, first
# served, for comparison. BUDGET_USD gives the spiky source a daily budget of that many USD:
# the campaign's events past it wait (counted apart from lost ones) while the blog's go on. The same binary and flags run against
# `docker compose up` (README). Everything listens on 127.0.0.1 and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
SPIKE_EVENTS="${SPIKE_EVENTS:-10000}"
STEADY_RATE="${STEADY_RATE:-2}"
DURATION="${DURATION:-240}"
FAIRNESS="${FAIRNESS:-source}"
BUDGET_USD="${BUDGET_USD:-}"
REGISTRY_PORT="${REGISTRY_PORT:-8081}"
PORT="${BROKER_PORT:-19094}"
export BROKER_PORT="$PORT"
RUN=.spillway/spike
export BROKER_DIR="$RUN/broker"
# An earlier run's broker is stopped through its pid file, before anything is deleted; then
# every port this run needs must be free.
scripts/broker.sh stop
for port in 8088 8089 9464 9465 "$REGISTRY_PORT" "$PORT" "$((PORT + 1))"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use (an earlier run still going?); stop it first"; exit 1
  fi
done
rm -rf "$RUN"; mkdir -p "$RUN"
pids=()
cleanup() {
  for p in ${pids[@]+"${pids[@]}"}; do kill -TERM "$p" 2>/dev/null || true; done
  for p in ${pids[@]+"${pids[@]}"}; do wait "$p" 2>/dev/null || true; done
  scripts/broker.sh stop || true
}
trap cleanup EXIT
trap 'exit 143' TERM INT   # so a stopped run still stops what it started
wait_ready() {
  for _ in $(seq 1 300); do
    curl -fs "http://127.0.0.1:$3/readyz" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || { echo "$1 exited:"; tail -30 "$RUN/$1.log"; exit 1; }
    sleep 0.1
  done
  echo "$1 was not ready within 30 s"; tail -30 "$RUN/$1.log"; exit 1
}

echo "== building (release)"
cargo build --release --quiet --bin spillway -p spillway --bin spillway-mock-llm -p spillway-mock-llm \
  --bin load-test -p spillway-load-tests
scripts/broker.sh start
"$(scripts/tools.sh rivven-schema)" serve --host 127.0.0.1 --port "$REGISTRY_PORT" \
  >"$RUN/registry.log" 2>&1 & pids+=($!)
for _ in $(seq 1 300); do
  curl -fs "http://127.0.0.1:$REGISTRY_PORT/subjects" >/dev/null 2>&1 && break
  sleep 0.1
done
target/release/spillway-mock-llm --listen 127.0.0.1:8089 --rpm 3000 --latency-ms 200 \
  --latency-jitter-ms 100 >"$RUN/mock-llm.log" 2>&1 & pids+=($!)
processor_config=load-tests/config/spike-processor.toml
if [ -n "$BUDGET_USD" ]; then
  processor_config="$RUN/processor.toml"
  { cat load-tests/config/spike-processor.toml
    printf '\n[llm.budget]\ntopic = "spillway.budget"\nrecheck_ms = 1000\n'
    printf '\n[[llm.budget.limits]]\nname = "campaign-daily"\nperiod = "day"\nusd = %s\nsource = "/webhooks/campaign"\n' "$BUDGET_USD"
  } >"$processor_config"
fi
SPILLWAY_KAFKA__BROKERS="127.0.0.1:$PORT" SPILLWAY_CODEC__SCHEMA_REGISTRY_URL="http://127.0.0.1:$REGISTRY_PORT" \
  SPILLWAY_JOURNAL__STATE_DIR="$RUN/state" SPILLWAY_PROCESSOR__FAIRNESS__BY="$FAIRNESS" \
  target/release/spillway processor --config "$processor_config" \
  >"$RUN/processor.log" 2>&1 & proc=$!; pids+=($proc)
wait_ready processor "$proc" 9464
export STEADY_WEBHOOK_SECRET="whsec_c3BpbGx3YXktbG9hZC10ZXN0LXN0ZWFkeS1zZWNyZXQ="
export SPIKE_WEBHOOK_SECRET="whsec_c3BpbGx3YXktbG9hZC10ZXN0LXNwaWtlLXNlY3JldC0="
SPILLWAY_KAFKA__BROKERS="127.0.0.1:$PORT" SPILLWAY_REGISTRY__URL="http://127.0.0.1:$REGISTRY_PORT" \
  target/release/spillway ingress --config load-tests/config/spike-ingress.toml \
  >"$RUN/ingress.log" 2>&1 & ingress=$!; pids+=($ingress)
wait_ready ingress "$ingress" 9465

verdict=0
target/release/load-test --ingress http://127.0.0.1:8088 --brokers "127.0.0.1:$PORT" \
  --results spillway.results --dlq spillway.dlq --simulator http://127.0.0.1:8089 \
  --steady-source blog --spike-source campaign --steady-rate "$STEADY_RATE" \
  --duration-secs "$DURATION" --spike-events "$SPIKE_EVENTS" \
  --processor-metrics http://127.0.0.1:9464/metrics --group spillway-spike \
  --input-topic spillway.events || verdict=$?
exit "$verdict"
