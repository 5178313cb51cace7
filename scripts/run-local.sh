#!/usr/bin/env bash
# The README's run command: a local Apache Kafka broker (scripts/broker.sh), a schema
# registry, the LLM provider simulator, a demo webhook receiver, the ingress
# (config/ingress-local.toml) and the processor (config/example.toml: LLM classification,
# then a route on its label: negative comments to the webhook, the others to the
# transactional result topic, with the step journal). First WEBHOOKS (default 200) signed
# webhooks travel ingress -> Kafka (Avro, Confluent framing) -> processor -> destinations,
# with every tenth one replayed to show replay protection; then a burst of EVENTS (default
# 2000) demo events produced straight to the topic. Prints a short summary (how many went
# where, lost and duplicated, the provider's view), then stops everything cleanly (SIGTERM;
# the ingress flushes, the processor drains and commits). Exits 1 if an event was lost or
# duplicated.
# Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS="${EVENTS:-2000}"
WEBHOOKS="${WEBHOOKS:-200}"
REGISTRY_PORT="${REGISTRY_PORT:-8081}"
PORT="${BROKER_PORT:-19092}"
export BROKER_PORT="$PORT"
RUN=.spillway/run; mkdir -p "$RUN"
# A fresh broker every run, so the counts below are this run's.
export BROKER_DIR="$RUN/broker"; scripts/broker.sh stop; rm -rf "$BROKER_DIR"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  scripts/broker.sh stop || true
}
trap cleanup EXIT
# wait_ready NAME PID PORT: until http://127.0.0.1:PORT/readyz answers 2xx (30 s), or the
# process exits (then its log tail is shown).
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
  --bin demo -p spillway-load-tests
scripts/broker.sh start

echo "== schema registry (rivven-schema, Confluent-compatible) on 127.0.0.1:$REGISTRY_PORT"
"$(scripts/tools.sh rivven-schema)" serve --host 127.0.0.1 --port "$REGISTRY_PORT" \
  >"$RUN/registry.log" 2>&1 & pids+=($!)

echo "== LLM provider simulator on 127.0.0.1:8089 (3,000 RPM, 200 ms latency)"
target/release/spillway-mock-llm --listen 127.0.0.1:8089 --rpm 3000 --latency-ms 200 \
  --latency-jitter-ms 100 >"$RUN/mock-llm.log" 2>&1 & pids+=($!)

echo "== demo webhook receiver on 127.0.0.1:8090 (the example config's sink)"
target/release/demo sink --addr 127.0.0.1:8090 >"$RUN/sink.log" 2>&1 & pids+=($!)

echo "== processor: config/example.toml with SPILLWAY_KAFKA__BROKERS=127.0.0.1:$PORT"
SPILLWAY_KAFKA__BROKERS="127.0.0.1:$PORT" SPILLWAY_CODEC__SCHEMA_REGISTRY_URL="http://127.0.0.1:$REGISTRY_PORT" \
  target/release/spillway processor --config config/example.toml \
  >"$RUN/processor.log" 2>&1 & proc=$!; pids+=($proc)
wait_ready processor "$proc" 9464

# A demo secret; a real one comes from the sender's dashboard.
export BLOG_WEBHOOK_SECRET="whsec_c3BpbGx3YXktbG9jYWwtZGVtby1zZWNyZXQtMzJieXQ="
echo "== ingress: config/ingress-local.toml, plain HTTP on 127.0.0.1:8088"
SPILLWAY_KAFKA__BROKERS="127.0.0.1:$PORT" SPILLWAY_REGISTRY__URL="http://127.0.0.1:$REGISTRY_PORT" \
  target/release/spillway ingress --config config/ingress-local.toml \
  >"$RUN/ingress.log" 2>&1 & ingress=$!; pids+=($ingress)
wait_ready ingress "$ingress" 9465

echo "== a tampered webhook is refused:"
curl -s -X POST http://127.0.0.1:8088/webhooks/blog -H 'content-type: application/json' \
  -H 'webhook-id: msg_forged' -H "webhook-timestamp: $(date +%s)" \
  -H 'webhook-signature: v1,Zm9yZ2VkLXNpZ25hdHVyZS1mb3JnZWQtc2lnbmF0dXJlIQ==' \
  -d '{"text":"forged"}' -w ' (HTTP %{http_code})\n'

echo "== sending $WEBHOOKS signed webhooks (Standard Webhooks) to http://127.0.0.1:8088/webhooks/blog"
target/release/demo send --url http://127.0.0.1:8088/webhooks/blog --secret "$BLOG_WEBHOOK_SECRET" \
  --count "$WEBHOOKS"
echo "== the ingress's view: $(curl -fs http://127.0.0.1:9465/metrics | grep -E '^spillway_ingress_requests_total' | tr '\n' ' ')"
for _ in $(seq 1 300); do
  done_count=$(curl -fs http://127.0.0.1:9464/metrics | awk '/^spillway_events_total/ {s+=$2} END {print s+0}')
  [ "$done_count" -ge "$WEBHOOKS" ] && break
  sleep 0.2
done
echo "== $done_count webhooks went through the processor"

EVENTS_TOTAL=$((EVENTS + WEBHOOKS))
echo "== producing $EVENTS events over 200 keys to spillway.events"
target/release/demo produce --brokers "127.0.0.1:$PORT" --topic spillway.events --count "$EVENTS" --keys 200

echo "== waiting for them to finish (watching http://127.0.0.1:9464/metrics)"
done_count=0
for _ in $(seq 1 600); do
  done_count=$(curl -fs http://127.0.0.1:9464/metrics | awk '/^spillway_events_total/ {s+=$2} END {print s+0}')
  [ "$done_count" -ge "$EVENTS_TOTAL" ] && break
  sleep 0.2
done
echo "== $done_count events finished; summary (the full figures: curl http://127.0.0.1:9464/metrics, curl http://127.0.0.1:8089/stats):"
verdict=0
target/release/demo summary --expected "$EVENTS_TOTAL" --brokers "127.0.0.1:$PORT" \
  --results spillway.results --dlq spillway.dlq --metrics http://127.0.0.1:9464/metrics \
  --simulator http://127.0.0.1:8089 --receiver http://127.0.0.1:8090 || verdict=$?

echo "== SIGTERM: the ingress drains and flushes"
kill -TERM "$ingress"; wait "$ingress"; echo "ingress exited with $?"
echo "== SIGTERM: the processor drains, commits and leaves the group"
kill -TERM "$proc"; wait "$proc"; echo "processor exited with $?"
tail -3 "$RUN/processor.log"
exit "$verdict"
