#!/usr/bin/env bash
# A single-node Apache Kafka broker (KRaft, combined broker and controller) on loopback.
#   scripts/broker.sh start    install Kafka if missing (cached), start it in the background,
#                              wait until it answers metadata requests
#   scripts/broker.sh stop     stop it by pid (SIGTERM, then SIGKILL after 30 s)
#   scripts/broker.sh status   running or stopped (exit 1)
#   scripts/broker.sh run      format if needed, then exec the broker in the foreground (what
#                              `start` runs in the background, and what the tests spawn)
# BROKER_PORT (default 9092), BROKER_CONTROLLER_PORT (default BROKER_PORT+1), BROKER_DIR
# (default .spillway/broker: data, server.properties, broker.log, broker.pid) and
# BROKER_HEAP (default 512m) configure it. The settings are scripts/kafka/server.properties.
set -euo pipefail
SCRIPTS="$(cd "$(dirname "$0")" && pwd)"
cd "$SCRIPTS/.."
PORT="${BROKER_PORT:-9092}"
CONTROLLER_PORT="${BROKER_CONTROLLER_PORT:-$((PORT + 1))}"
DIR="${BROKER_DIR:-.spillway/broker}"
HEAP="${BROKER_HEAP:-512m}"
PIDFILE="$DIR/broker.pid"
# Fixed, so a data directory formatted once is always accepted again.
CLUSTER_ID=spillway-test-kafka-01

# Running: the pid file names a live process that is this script or the broker it became (a
# stale pid file from a crash may name an unrelated process by now).
running() {
  [ -f "$PIDFILE" ] || return 1
  local pid; pid=$(cat "$PIDFILE")
  kill -0 "$pid" 2>/dev/null && grep -qaE 'kafka\.Kafka|broker\.sh' "/proc/$pid/cmdline" 2>/dev/null
}

# The broker answers metadata requests once it is unfenced: its listener opens only then.
ready() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

run() {
  local home
  home=$("$SCRIPTS/tools.sh" kafka)
  mkdir -p "$DIR/data"
  DIR="$(cd "$DIR" && pwd)"
  {
    cat "$SCRIPTS/kafka/server.properties"
    echo "listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT"
    echo "advertised.listeners=PLAINTEXT://127.0.0.1:$PORT"
    echo "controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT"
    echo "log.dirs=$DIR/data"
  } > "$DIR/server.properties"
  local java=(java -Xmx"$HEAP" -Xms"$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20
    -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$SCRIPTS/kafka/log4j2.yaml" -cp "$home/libs/*")
  if [ ! -f "$DIR/data/meta.properties" ]; then
    "${java[@]}" kafka.tools.StorageTool format -t "$CLUSTER_ID" -c "$DIR/server.properties" >&2
  fi
  exec "${java[@]}" kafka.Kafka "$DIR/server.properties"
}

case "${1:-}" in
  run) run ;;
  start)
    if running; then echo "[broker] already running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT" >&2; exit 0; fi
    "$SCRIPTS/tools.sh" kafka >/dev/null   # install (or fail) in the foreground, with its output
    mkdir -p "$DIR"
    (exec "$SCRIPTS/broker.sh" run >"$DIR/broker.log" 2>&1) &
    echo $! > "$PIDFILE"
    for _ in $(seq 1 600); do
      if ! running; then echo "[broker] Apache Kafka exited; the end of $DIR/broker.log:" >&2; tail -30 "$DIR/broker.log" >&2; exit 1; fi
      if ready; then echo "[broker] Apache Kafka ready on 127.0.0.1:$PORT (data in $DIR)" >&2; exit 0; fi
      sleep 0.1
    done
    echo "[broker] Apache Kafka did not open 127.0.0.1:$PORT within 60 s; see $DIR/broker.log" >&2; exit 1 ;;
  stop)
    if running; then
      pid=$(cat "$PIDFILE")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; echo "[broker] killed (no exit within 30 s)" >&2; else echo "[broker] stopped" >&2; fi
    fi
    rm -f "$PIDFILE" ;;
  status)
    if running; then echo "running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT"; else echo "stopped"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status|run" >&2; exit 2 ;;
esac
