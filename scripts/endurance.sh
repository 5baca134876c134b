#!/usr/bin/env bash
# `make soak` / `make burst`: tests/endurance.py against a server of its own on ports $PORT_BASE..+2.
# Usage: scripts/endurance.sh soak|burst [extra flags for tests.endurance]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/server.sh
start_server
"$BIN/python" -m tests.endurance "$1" --grpc "127.0.0.1:$GRPC_PORT" --metrics "127.0.0.1:$METRICS_PORT" \
  --server-pid "$SERVER_PID" "${@:2}"
