#!/usr/bin/env bash
# `make bench-tools`: our peers' own load tools against the server. genai-perf (installed once into
# .venv-tools, beside its own dependencies) on the peers-sized workload (docs/peers.md), then perf_analyzer.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/server.sh
TOOLS=${TOOLS_VENV:-.venv-tools}
OUT=${BENCH_TOOLS_OUT:-artifacts/bench-tools}
CONCURRENCY=${CONCURRENCY:-32}
if [ ! -x "$TOOLS/bin/genai-perf" ]; then
  echo "[bench-tools] installing genai-perf into $TOOLS (once)" >&2
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q --disable-pip-version-check "genai-perf==0.0.8" "tritonclient[all]==2.51.*" \
    "transformers>=5.0,<6"
fi
MODEL_DIR=$("$BIN/python" -c "from bucketserve_client.defaults import default_model_dir as d; print(d())")
# perf_analyzer (which genai-perf drives) comes with the project's tritonclient; it needs these libraries
LD_LIBRARY_PATH="$("$BIN/python" -c "from bucketserve_client.perf_tools import library_dir as d; print(d())"):${LD_LIBRARY_PATH:-}"
export LD_LIBRARY_PATH
start_server
mkdir -p "$OUT"
echo "[bench-tools] genai-perf: 64 prompts of ~253 tokens, exactly 64 output tokens, concurrency $CONCURRENCY" >&2
COLUMNS=160 PATH="$PWD/$BIN:$PATH" "$TOOLS/bin/genai-perf" profile -m bucketserve --service-kind triton --backend vllm \
  --streaming --tokenizer "$MODEL_DIR" -u "127.0.0.1:$GRPC_PORT" --server-metrics-url "http://127.0.0.1:$METRICS_PORT/metrics" \
  --synthetic-input-tokens-mean 253 --synthetic-input-tokens-stddev 100 \
  --output-tokens-mean 64 --output-tokens-mean-deterministic \
  --num-prompts 64 --concurrency "$CONCURRENCY" --measurement-interval 10000 --random-seed 0 \
  --artifact-dir "$OUT/genai-perf" -- --max-trials 4 2>&1 | tee "$OUT/genai-perf.txt"
echo "[bench-tools] perf_analyzer: streaming, concurrency $CONCURRENCY" >&2
"$BIN/python" - "$OUT/perf-input.json" <<'PY'
import json, sys
prompt = "def serve(requests):\n    " + "for request in requests: handle(request)\n    " * 20
sampling = json.dumps({"max_tokens": 64, "min_tokens": 64, "temperature": 0})
row = {"text_input": [prompt], "stream": [True], "exclude_input_in_output": [True], "sampling_parameters": [sampling]}
json.dump({"data": [row]}, open(sys.argv[1], "w"))
PY
"$BIN/bucketserve-client" perf-analyzer -- -m bucketserve -i grpc --streaming -u "127.0.0.1:$GRPC_PORT" \
  --input-data "$OUT/perf-input.json" --concurrency-range "$CONCURRENCY" --request-count 256 \
  --measurement-mode count_windows 2>&1 | tee "$OUT/perf-analyzer.txt"
