"""Malformed requests over gRPC and HTTP: each gets exactly one clear INVALID_ARG error, while
well-formed requests running at the same time finish with the right text and the server stays READY."""

from __future__ import annotations

import queue
import threading
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from bucketserve_client import BucketServeClient
from tests.bad_inputs import CASES, GOOD, Case

from .conftest import post_json

def inputs_of(case: Case) -> list[grpcclient.InferInput]:
    inputs = []
    for name, array in case.arrays().items():
        dtype = "BYTES" if array.dtype == np.object_ else {np.bool_: "BOOL", np.int32: "INT32", np.int64: "INT64", np.float32: "FP32",
                                                            np.uint64: "UINT64"}[array.dtype.type]
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        inputs.append(t)
    return inputs


def grpc_answers(url: str, inputs: list, parameters: dict[str, Any]) -> list[tuple[Any, Any]]:
    """Everything one request's stream delivers, until the server closes it (nothing may follow the final answer)."""
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer("bucketserve", inputs, enable_empty_final_response=True, parameters=parameters or None)
    answers = [got.get(timeout=60)]
    client.stop_stream()  # returns once the server has closed the stream
    client.close()
    while not got.empty():
        answers.append(got.get())
    return answers


def test_bad_requests_each_get_one_clear_error_while_good_ones_finish(server):
    expected = BucketServeClient(server.grpc_url).generate(GOOD, max_tokens=24, temperature=0).text
    good_texts: list[str] = []
    stop = threading.Event()

    def good_traffic() -> None:
        client = BucketServeClient(server.grpc_url)
        while not stop.is_set():
            good_texts.append(client.generate(GOOD, max_tokens=24, temperature=0).text)

    workers = [threading.Thread(target=good_traffic) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        failures = []
        for case in (c for c in CASES if c.grpc):
            answers = grpc_answers(server.grpc_url, inputs_of(case), case.parameters)
            errors = [e for _, e in answers if e is not None]
            if len(answers) != 1 or len(errors) != 1 or case.message not in errors[0].message():
                failures.append((case.name, [(r is not None, e and e.message()) for r, e in answers]))
        for case in (c for c in CASES if c.http):
            req = urllib.request.Request(f"http://127.0.0.1:{server.http}/v2/models/bucketserve/generate",
                                         data=case.http_body(), headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    failures.append((f"HTTP {case.name}", r.status))
            except urllib.error.HTTPError as e:
                text = e.read().decode()
                if e.code != case.http or case.message not in text:
                    failures.append((f"HTTP {case.name}", e.code, text))
        assert not failures, failures
    finally:
        stop.set()
        for w in workers:
            w.join(120)
    assert len(good_texts) >= 3 and set(good_texts) == {expected}
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http}/v2/health/ready", timeout=10) as r:
        assert r.status == 200
    # the stream endpoint answers a bad request with a 400 too, not an event stream
    status, body = post_json(f"http://127.0.0.1:{server.http}/v2/models/bucketserve/generate_stream",
                             {"text_input": "hi", "top_p": 9, "stream": True})
    assert status == 400 and "top_p must be in (0, 1]" in body

