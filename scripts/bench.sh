#!/usr/bin/env bash
# `make bench`: the README's figures. One server with the three policy models; the identical seeded
# mixed workload offline against each, then an SLO sweep of Poisson arrivals; report in $BENCH_OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/server.sh
BENCH_OUT=${BENCH_OUT:-docs/bench}
BENCH_RATES=${BENCH_RATES:-1,2,4,6,8}
start_server
targets=""
for model in bucketserve bucketserve_continuous bucketserve_fcfs_static; do
  targets+="${targets:+,}triton://127.0.0.1:$GRPC_PORT/$model?metrics=$METRICS_PORT"
done
"$BIN/bucketserve-client" bench --targets "$targets" --workload mixed --num-requests 96 \
  --rates "$BENCH_RATES" --sweep-seconds 30 --out "$BENCH_OUT" "$@"
