"""The benchmark's target adapters against the real server: Triton over gRPC, and the OpenAI
gateway in front of it; then a tiny side-by-side `bucketserve-client bench` run with its report."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from bucketserve_client import BucketServeClient
from bucketserve_client.targets import OpenAITarget, TritonTarget
from bucketserve_client.workload import DEFAULT_CLASSES, RequestSpec

from tests.waiting import wait_for

from .conftest import free_ports, post_json

PROMPT = "def parse(text):\n    return"


@pytest.fixture(scope="module")
def gateway(server, model_dir, tmp_path_factory):
    """The gateway on its own (`bucketserve openai-gateway`)."""
    (port,) = free_ports(1)
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    proc = subprocess.Popen([sys.executable, "-m", "bucketserve.cli", "openai-gateway", "--url", server.grpc_url,
                             "--port", str(port), "--tokenizer", str(model_dir)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)

    def up() -> bool:
        assert proc.poll() is None, f"gateway exited:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            return False

    try:
        wait_for(up, timeout=60, what="the gateway answers /v1/models")
    except AssertionError:
        proc.kill()
        raise
    yield port
    proc.terminate()
    proc.wait(30)


def post(port: int, body: dict) -> tuple[int, str]:
    return post_json(f"http://127.0.0.1:{port}/v1/completions", body)


def test_gateway_lists_models_and_completes_like_triton(server, gateway):
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway}/v1/models") as r:
        ids = [m["id"] for m in json.load(r)["data"]]
    assert ids == ["bucketserve", "bucketserve_continuous", "bucketserve_fcfs_static"]
    expected = BucketServeClient(server.grpc_url).generate(PROMPT, max_tokens=12, temperature=0)
    status, raw = post(gateway, {"model": "bucketserve", "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    body = json.loads(raw)
    assert status == 200 and body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    assert body["usage"] == {"prompt_tokens": expected.num_input_tokens, "completion_tokens": 12,
                             "total_tokens": expected.num_input_tokens + 12}
    status, raw = post(gateway, {"model": "bucketserve", "prompt": [PROMPT], "max_tokens": 12, "temperature": 0,
                                 "stream": True, "stream_options": {"include_usage": True}})
    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected.text
    assert chunks[-1]["usage"]["completion_tokens"] == 12 and chunks[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("body,status,message", [
    ({"prompt": "hi", "top_p": 3}, 400, "top_p must be in (0, 1], got 3"),  # the backend's own validation
    ({"prompt": "hi", "max_tokens": 0, "stream": True}, 400, "max_tokens must be >= 1"),
    ({"prompt": "hi", "n": 2}, 400, "n=2 is not supported"),
    ({"prompt": ["a", "b"]}, 400, "prompt must be a string"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model 'gpt-4' does not exist"),
])
def test_gateway_refuses_bad_requests_with_openai_errors(gateway, body, status, message):
    code, raw = post(gateway, body)
    assert code == status
    assert message in json.loads(raw)["error"]["message"]


def test_adapters_time_a_request_and_count_its_tokens(server, gateway):
    spec = RequestSpec(0, 9, DEFAULT_CLASSES[0], PROMPT)
    triton = TritonTarget(f"triton://{server.grpc_url}/bucketserve?metrics={server.metrics}")
    openai = OpenAITarget(f"openai://127.0.0.1:{gateway}/v1")

    async def both():
        replies = [await triton.send(spec), await openai.send(spec)]
        missing = await TritonTarget(f"triton://{server.grpc_url}/no_such_model").send(spec)
        await triton.close()
        await openai.close()
        return replies, missing

    replies, missing = asyncio.run(both())
    for reply in replies:
        assert reply.error is None and reply.output_tokens == 9 and 0 < reply.ttft <= reply.e2e
    assert openai.model == "bucketserve"  # the first model /v1/models lists
    assert triton.metrics_url == f"http://127.0.0.1:{server.metrics}/metrics"
    assert missing.error and "no_such_model" in missing.error and missing.output_tokens == 0


def test_bench_runs_targets_side_by_side_and_writes_the_report(server, gateway, model_dir, tmp_path):
    triton = f"triton://{server.grpc_url}/bucketserve?metrics={server.metrics}"
    openai = f"openai://127.0.0.1:{gateway}/v1?model=bucketserve_fcfs_static"
    out = subprocess.run(
        [sys.executable, "-m", "bucketserve_client.cli", "bench", "--targets", f"{triton},{openai}",
         "--tokenizer", str(model_dir), "--num-requests", "8", "--rates", "4,16", "--sweep-seconds", "1", "--full-sweep",
         "--warmup", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["targets"]) == ["bucketserve", "bucketserve_fcfs_static@127.0.0.1:" + str(gateway)]
    assert "bucketserve offline: [" in out.stderr and "8/8 requests" in out.stderr  # progress per run
    for t in results["targets"].values():
        offline = t["offline"]["summary"]
        # ignore_eos: every target generates exactly the requested tokens, so tokens/s compares like work
        assert offline["completed"] == 8 and offline["output_tokens"] == sum(
            o["output_tokens"] for o in t["offline"]["outcomes"])
        assert t["output_tokens_per_s"] == offline["output_tokens_per_s"] > 0
        assert [p["rate"] for p in t["sweep"]] == [4.0, 16.0]
        # at least 8, else rate x 1 s (sent, not completed: the sweep's slo_ms may end some on a busy machine)
        assert [p["summary"]["requests"] for p in t["sweep"]] == [8, 16]
        assert t["capacity_rps"] is None or 0 < t["capacity_rps"] <= 16
    figures = results["targets"]["bucketserve"]["offline"]["server"]
    assert figures["prefill_batches"] >= 1 and 0 <= figures["prefill_padding"] < 1
    assert 0 <= figures["decode_padding"] < 1 and 0 < figures["kv_peak_bytes"] <= figures["kv_budget_bytes"]
    assert figures["server_output_tokens"] == results["targets"]["bucketserve"]["offline"]["summary"]["output_tokens"]
    assert results["targets"]["bucketserve_fcfs_static@127.0.0.1:" + str(gateway)]["offline"]["server"] == {}
    report = (tmp_path / "report.md").read_text()
    assert "| bucketserve |" in report and "capacity at 80%" in report
    for name in ("slo_attainment.png", "throughput.png", "latency_cdf.png", "buckets.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_client_leaving_the_gateway_cancels_its_request(server, gateway):
    """The stream is dropped after its first token: the server stops generating well before max_tokens."""
    import http.client

    def tokens() -> float:
        return server.metric("bucketserve_output_tokens_total")

    before = server.settled(("bucketserve_output_tokens_total",))["bucketserve_output_tokens_total"]
    conn = http.client.HTTPConnection("127.0.0.1", gateway, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": "bucketserve", "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}),
        {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    while not response.readline().startswith(b"data: "):
        pass
    conn.close()
    # the cancelled request is counted when it ends, on the metrics port's next refresh
    wait_for(lambda: tokens() > before and server.metric("bucketserve_requests_running") == 0, timeout=60)
    generated = tokens() - before
    assert server.metric("bucketserve_requests_running") == 0
    assert 1 <= generated < 500, f"{generated} tokens generated after the client left"
