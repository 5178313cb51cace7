#!/usr/bin/env bash
# Local Kafka-protocol broker (tansu) on loopback with SQLite storage.
#   scripts/broker.sh start   install tansu if missing (cached), start it, wait until ready
#   scripts/broker.sh stop    stop it
#   scripts/broker.sh status
# BROKER_PORT (default 9092) and BROKER_DIR (default .spillway/broker) configure it.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${BROKER_PORT:-9092}"
DIR="${BROKER_DIR:-.spillway/broker}"
PIDFILE="$DIR/tansu.pid"

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

case "${1:-}" in
  start)
    if running; then echo "[broker] already running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT" >&2; exit 0; fi
    bin=$(scripts/tools.sh tansu)
    mkdir -p "$DIR"
    url="tcp://127.0.0.1:$PORT"
    # tansu wants a relative sqlite path, so it runs inside its data directory.
    (cd "$DIR" && exec "$bin" broker --listener-url "$url" --advertised-listener-url "$url" \
        --storage-engine sqlite://tansu.db >tansu.log 2>&1) &
    echo $! > "$PIDFILE"
    for _ in $(seq 1 100); do
      if ! running; then echo "[broker] tansu exited; see $DIR/tansu.log:" >&2; tail -20 "$DIR/tansu.log" >&2; exit 1; fi
      if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        echo "[broker] tansu ready on 127.0.0.1:$PORT (data in $DIR)" >&2; exit 0
      fi
      sleep 0.1
    done
    echo "[broker] tansu did not accept connections on 127.0.0.1:$PORT within 10 s" >&2; exit 1 ;;
  stop)
    if running; then kill "$(cat "$PIDFILE")"; wait "$(cat "$PIDFILE")" 2>/dev/null || true; echo "[broker] stopped" >&2; fi
    rm -f "$PIDFILE" ;;
  status)
    if running; then echo "running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT"; else echo "stopped"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
