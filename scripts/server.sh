# Sourced by the bench scripts: start `bucketserve serve` in the background on ports
# $PORT_BASE (HTTP), +1 (gRPC), +2 (metrics), wait for READY, and stop it when the script exits.
BIN=${BIN:-.venv/bin}
PORT_BASE=${PORT_BASE:-8100}
HTTP_PORT=$PORT_BASE
GRPC_PORT=$((PORT_BASE + 1))
METRICS_PORT=$((PORT_BASE + 2))
SERVER_LOG=${SERVER_LOG:-$(mktemp -t bucketserve-server.XXXXXX)}

start_server() {
  echo "[server] starting on ports $HTTP_PORT/$GRPC_PORT/$METRICS_PORT (log: $SERVER_LOG)" >&2
  "$BIN/bucketserve" serve --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" \
    "$@" >"$SERVER_LOG" 2>&1 &
  SERVER_PID=$!
  trap stop_server EXIT
  until grep -q "\[bucketserve\] READY" "$SERVER_LOG"; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "[server] failed to start:" >&2
      tail -30 "$SERVER_LOG" >&2
      exit 1
    fi
    sleep 0.5
  done
  echo "[server] READY" >&2
}

stop_server() {
  if [ -n "${SERVER_PID:-}" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || true
    echo "[server] stopped" >&2
  fi
}
