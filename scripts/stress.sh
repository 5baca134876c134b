#!/usr/bin/env bash
# `make stress`: exactly-once under stress at full size (2,000 requests over 64 streams by default),
# against a server of its own on ports $PORT_BASE..+2; fails if any request got other than one final
# answer, a wrong text, or if anything is left running afterwards, or if the server does not stop cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/server.sh
start_server
"$BIN/python" -m tests.stress --grpc "127.0.0.1:$GRPC_PORT" --http "127.0.0.1:$HTTP_PORT" \
  --metrics "127.0.0.1:$METRICS_PORT" --requests "${STRESS_REQUESTS:-2000}" --concurrency "${STRESS_CONCURRENCY:-64}"
kill -TERM "$SERVER_PID"
if wait "$SERVER_PID"; then
  echo "[stress] server stopped cleanly"
else
  echo "[stress] FAIL: the server did not stop cleanly (a request it never released?)"; tail -5 "$SERVER_LOG"; exit 1
fi
