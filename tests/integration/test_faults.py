"""Faults through the served model: injected errors fail only their own requests (INTERNAL), injected
out-of-memory is retried in halves, deadlines end requests, and a dead model process stops the server.

One server with the test-only fault hook (``$BUCKETSERVE_TEST_FAULTS``) serves this module.
"""

from __future__ import annotations

import os
import queue
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as grpcclient

from bucketserve.launcher.server import STUB_DIED_EXIT
from bucketserve.launcher.watchdog import children, stubs
from bucketserve_client import BucketServeClient
from bucketserve_client.client import BucketServeError, build_inputs

from tests.waiting import wait_for

from .conftest import start_server, stop_server

FAULTS = "prefill:error:text=PREFILL-BOOM,decode:error:text=DECODE-BOOM,prefill:oom:rows>2,decode:oom:rows>2"
PROMPTS = [f"request {i}: " + "def handle(request):\n    return " * (1 + i % 4) for i in range(8)]
GREEDY = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def faulty(model_dir, tmp_path_factory):
    server = start_server(model_dir, tmp_path_factory.mktemp("faults") / "server.log",
                          env={"BUCKETSERVE_TEST_FAULTS": FAULTS})
    client = BucketServeClient(server.grpc_url)
    server.expected = {p: client.generate(p, **GREEDY).text for p in PROMPTS}  # one at a time: no fault fires
    yield server
    if server.proc.poll() is None:
        assert stop_server(server) == 0


def generate(server, prompt: str, **sampling) -> str | BucketServeError:
    try:
        return BucketServeClient(server.grpc_url).generate(prompt, **sampling).text
    except BucketServeError as e:
        return e


def ready(server) -> int | str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http}/v2/health/ready", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError as e:
        return type(e).__name__


def test_out_of_memory_is_retried_in_smaller_batches_without_changing_the_output(faulty):
    """Every forward of more than two rows runs out of memory; eight concurrent requests still get
    exactly their greedy text."""
    before = faulty.metric("bucketserve_oom_retries_total")
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda p: generate(faulty, p, **GREEDY), PROMPTS))
    assert texts == [faulty.expected[p] for p in PROMPTS]
    wait_for(lambda: faulty.metric("bucketserve_oom_retries_total") > before, timeout=10)


@pytest.mark.parametrize("stage", ["PREFILL", "DECODE"])
def test_an_engine_error_fails_only_the_request_it_belongs_to(faulty, stage):
    """The victim's forward fails among others'; retried in halves, only the victim fails (INTERNAL)
    and the requests that shared its batch finish with exactly their text."""
    failed_before = faulty.metric("bucketserve_requests_failed_total")
    with ThreadPoolExecutor(6) as pool:
        others = [pool.submit(generate, faulty, p, **GREEDY) for p in PROMPTS[:5]]
        victim = pool.submit(generate, faulty, f"{stage}-BOOM " + PROMPTS[5], **GREEDY).result()
        outcomes = [f.result() for f in others]
    assert isinstance(victim, BucketServeError)
    assert str(victim).startswith("internal error in the model: InjectedFault"), victim
    assert outcomes == [faulty.expected[p] for p in PROMPTS[:5]]
    wait_for(lambda: faulty.metric("bucketserve_requests_failed_total") - failed_before == 1, timeout=10)
    assert ready(faulty) == 200
    assert generate(faulty, PROMPTS[6], **GREEDY) == faulty.expected[PROMPTS[6]]


def test_a_decode_fault_reaches_a_streaming_client_after_its_first_token(faulty):
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(faulty.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("bucketserve", build_inputs("DECODE-BOOM now", True, GREEDY),
                              enable_empty_final_response=True)
    first, error = results.get(timeout=60)
    assert error is None and not first.get_response().parameters["triton_final_response"].bool_param
    _, error = results.get(timeout=60)
    assert "InjectedFault" in str(error)
    client.stop_stream()  # returns once the server has closed the stream: all it sent has arrived
    assert results.empty()  # nothing after the error


def test_a_request_past_its_triton_timeout_ends_with_deadline_exceeded(faulty):
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(faulty.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    start = time.monotonic()
    client.async_stream_infer("bucketserve", build_inputs("tell me everything", True,
                                                          {"max_tokens": 2000, "ignore_eos": True}),
                              timeout=500_000, enable_empty_final_response=True)  # microseconds
    tokens = 0
    while True:
        result, error = results.get(timeout=60)
        if error is not None:
            break
        tokens += 1
    elapsed = time.monotonic() - start
    client.stop_stream()
    assert "deadline exceeded: the request's timeout of 500 ms passed" in str(error)
    assert 0 < tokens < 2000 and elapsed < 5
    wait_for(lambda: faulty.metric("bucketserve_requests_expired_total") >= 1
             and faulty.metric("bucketserve_requests_running") == 0 and faulty.metric("bucketserve_kv_cache_bytes") == 0,
             timeout=10)


def test_a_dead_model_process_stops_the_server_so_health_checks_fail(faulty):
    """Triton 2.51 alone keeps answering READY and fails every request with "Stub process ... is not
    healthy"; `bucketserve serve` notices the stub is gone and stops tritonserver (exit code 3)."""
    [tritonserver] = [pid for pid in children(faulty.proc.pid) if stubs(pid)]
    victims = [pid for pid, model in stubs(tritonserver).items() if model == "bucketserve"]
    assert len(victims) == 1 and ready(faulty) == 200
    os.kill(victims[0], signal.SIGKILL)
    assert faulty.proc.wait(60) == STUB_DIED_EXIT
    assert ready(faulty) != 200
    log = faulty.log.read_text()
    assert "the Python stub process of bucketserve (pid" in log and "stopping tritonserver" in log

