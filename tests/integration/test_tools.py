"""perf_analyzer from the tritonclient wheel drives the model; the launcher reports failures."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from bucketserve_client.perf_tools import perf_analyzer_command

from .conftest import free_ports, start_server, stop_server


def test_perf_analyzer_streaming_completes(server, tmp_path):
    data = {"data": [
        {"text_input": ["Hello there, tell me a story"], "stream": [True], "exclude_input_in_output": [True],
         "sampling_parameters": [json.dumps({"max_tokens": "16", "temperature": "0"})]},
        {"text_input": ["def f(x):\n    return x"], "stream": [True], "exclude_input_in_output": [True],
         "sampling_parameters": [json.dumps({"max_tokens": "8"})]},
    ]}
    (tmp_path / "input.json").write_text(json.dumps(data))
    exe, env = perf_analyzer_command()
    out = subprocess.run([exe, "-m", "bucketserve", "-i", "grpc", "--streaming", "-u", server.grpc_url,
                          "--input-data", str(tmp_path / "input.json"), "--concurrency-range", "4",
                          "--request-count", "24"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    # the client's own count; the "Server:" figures are statistics deltas sampled at the window's edges
    assert re.search(r"Client:\s*\n\s*Request count: 24\b", out.stdout), out.stdout
    assert "throughput:" in out.stdout


def test_launcher_reports_a_failed_load_and_exits_nonzero(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    http, grpc, metrics = free_ports(3)
    out = subprocess.run([sys.executable, "-m", "bucketserve.cli", "serve", "--model-path", str(empty),
                          "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "before READY" in out.stderr
    assert f"{empty} is not a Hugging Face model directory (no config.json)" in out.stderr


def test_launcher_applies_params_and_forwards_sigterm(model_dir, tmp_path):
    server = start_server(model_dir, tmp_path / "server.log", args=("--param", "dtype=bfloat16",
                                                                     "--param", "scheduler_policy=continuous"))
    for model in ("bucketserve", "bucketserve_fcfs_static"):  # every model, in place of its config.pbtxt's
        assert server.metric("bucketserve_model_info", model=model, dtype="bfloat16") > 0
    assert "policy continuous" in server.log.read_text()
    assert "policy bucket;" not in server.log.read_text()
    assert stop_server(server) == 0
    assert "tritonserver exited with code 0" in server.log.read_text()
