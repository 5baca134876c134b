"""Malformed requests over gRPC and HTTP: each gets exactly one clear INVALID_ARG error, while
well-formed requests running at the same time finish with the right text and the server stays READY."""

from __future__ import annotations

import json
import queue
import threading
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from bucketserve_client import BucketServeClient

from .conftest import post_json

GOOD = "The history of the city begins with"
QUIET_S = 0.5
"""After its error, a bad request's stream must stay silent this long: nothing may follow the final answer."""


def tensor(name: str, value: Any, dtype: str) -> grpcclient.InferInput:
    array = np.asarray(value, dtype=np.object_ if dtype == "BYTES" else None)
    if dtype != "BYTES":
        array = array.astype({"BOOL": np.bool_, "INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64}[dtype])
    t = grpcclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def prompt(text: Any = GOOD.encode()) -> grpcclient.InferInput:
    return tensor("text_input", [text], "BYTES")


def sampling(value: Any) -> grpcclient.InferInput:
    raw = value if isinstance(value, (str, bytes)) else json.dumps(value)
    return tensor("sampling_parameters", [raw.encode() if isinstance(raw, str) else raw], "BYTES")


HUGE = ("word " * 5000).encode()  # ~5,000 tokens: beyond the 2,048-token context

# (case, inputs, the error message must contain this)
GRPC_CASES: list[tuple[str, list, str]] = [
    ("missing text_input", [tensor("stream", [True], "BOOL")], "text_input"),
    ("text_input as INT32", [tensor("text_input", [7], "INT32")], "text_input"),
    ("text_input with two elements", [tensor("text_input", [b"a", b"b"], "BYTES")], "text_input"),
    ("empty prompt", [prompt(b"")], "text_input is empty"),
    ("invalid UTF-8 prompt", [prompt(b"\xff\xfe\xfd")], "text_input is not valid UTF-8"),
    ("prompt beyond the context", [prompt(HUGE)], "longer than the context allows"),
    ("a megabyte of prompt", [prompt(b"x" * 1_000_000)], "more than the 2048-token context can hold"),
    ("sampling_parameters not JSON", [prompt(), sampling("{max_tokens: 4")], "sampling_parameters is not valid JSON"),
    ("sampling_parameters a JSON array", [prompt(), sampling([1, 2])], "must be a JSON object, got list"),
    ("unknown sampling key", [prompt(), sampling({"beam_width": 4})], "unknown key 'beam_width'"),
    ("negative max_tokens", [prompt(), sampling({"max_tokens": -5})], "max_tokens must be >= 1"),
    ("absurd max_tokens", [prompt(), sampling({"max_tokens": 10**9})], "max_tokens 1000000000 is beyond the context"),
    ("max_tokens not a number", [prompt(), sampling({"max_tokens": "many"})], "max_tokens must be an integer"),
    ("max_tokens a boolean", [prompt(), sampling({"max_tokens": True})], "max_tokens must be an integer, got a boolean"),
    ("negative temperature", [prompt(), sampling({"temperature": -1})], "temperature must be >= 0"),
    ("temperature NaN", [prompt(), sampling({"temperature": "nan"})], "temperature must be finite"),
    ("top_p zero", [prompt(), sampling({"top_p": 0})], "top_p must be in (0, 1]"),
    ("top_p above one", [prompt(), sampling({"top_p": 1.5})], "top_p must be in (0, 1]"),
    ("negative top_k", [prompt(), sampling({"top_k": -1})], "top_k must be >= 0"),
    ("negative seed", [prompt(), sampling({"seed": -1})], "seed must be in [0, 2**64)"),
    ("min_tokens above max_tokens", [prompt(), sampling({"max_tokens": 4, "min_tokens": 9})],
     "min_tokens must be between 0 and max_tokens"),
    ("stop of the wrong type", [prompt(), sampling({"stop": 5})], "stop must be a string or a list of strings"),
    ("stop list holding a number", [prompt(), sampling({"stop": ["a", 3]})], "must be a string or a list of strings"),
    ("stop_words as INT32", [prompt(), tensor("stop_words", [1, 2], "INT32")], "stop_words"),
    ("unknown priority class", [prompt(), sampling({"priority": 7})], "priority must be one of (0, 1)"),
    ("priority not a number", [prompt(), sampling({"priority": "gold"})], "priority must be an integer"),
    ("slo_ms zero", [prompt(), sampling({"slo_ms": 0})], "slo_ms must be >= 1"),
    ("ignore_eos not a boolean", [prompt(), sampling({"ignore_eos": "maybe"})], "ignore_eos must be a boolean"),
    ("max_tokens tensor with two elements", [prompt(), tensor("max_tokens", [4, 5], "INT32")],
     "unexpected shape for input 'max_tokens'"),  # Triton checks shapes against the config first
    ("stream tensor as BYTES", [prompt(), tensor("stream", [b"yes"], "BYTES")], "stream"),
    ("echo while streaming", [prompt(), tensor("stream", [True], "BOOL"),
                              tensor("exclude_input_in_output", [False], "BOOL")],
     "exclude_input_in_output=false is not allowed when streaming"),
]

# (case, body, HTTP status, the error must contain this). Triton's generate endpoint parses the body and
# converts keys named like an input tensor before the model sees the request; what fails there gets
# Triton's own answer, 500 (a non-JSON body; a word where a number tensor goes, as for "temperature").
HTTP_CASES: list[tuple[str, Any, int, str]] = [
    ("body not JSON", b"{text_input: hi", 500, "failed to parse the request JSON buffer"),
    ("missing text_input", {"max_tokens": 4}, 400, "text_input"),
    ("empty prompt", {"text_input": ""}, 400, "text_input is empty"),
    ("negative max_tokens", {"text_input": "hi", "max_tokens": -1}, 400, "max_tokens must be >= 1"),
    ("stop of the wrong type", {"text_input": "hi", "stop": 5}, 400, "parameters.stop must be a string or a list"),
    ("unknown key", {"text_input": "hi", "beam_width": 2}, 400, "unknown key 'beam_width' in parameters"),
    ("unknown priority class", {"text_input": "hi", "priority": 3}, 400, "priority must be one of (0, 1)"),
    ("sampling_parameters not JSON", {"text_input": "hi", "sampling_parameters": "{oops"}, 400,
     "sampling_parameters is not valid JSON"),
]


def grpc_answers(url: str, inputs: list) -> list[tuple[Any, Any]]:
    """Everything one request's stream delivers: up to its final answer, then QUIET_S of silence."""
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer("bucketserve", inputs, enable_empty_final_response=True)
    answers = [got.get(timeout=60)]
    while True:
        try:
            answers.append(got.get(timeout=QUIET_S))
        except queue.Empty:
            break
    client.stop_stream()
    client.close()
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
        for case, inputs, message in GRPC_CASES:
            answers = grpc_answers(server.grpc_url, inputs)
            errors = [e for _, e in answers if e is not None]
            if len(answers) != 1 or len(errors) != 1 or message not in errors[0].message():
                failures.append((case, [(r is not None, e and e.message()) for r, e in answers]))
        for case, body, status, message in HTTP_CASES:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{server.http}/v2/models/bucketserve/generate", data=raw,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    failures.append((f"HTTP {case}", r.status))
            except urllib.error.HTTPError as e:
                text = e.read().decode()
                if e.code != status or message not in text:
                    failures.append((f"HTTP {case}", e.code, text))
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

