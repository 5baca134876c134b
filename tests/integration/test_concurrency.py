"""Many requests of very different lengths share padded batches and must not disturb each other."""

from __future__ import annotations

import http.client
import json
import queue
import random
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from bucketserve_client import BucketServeClient
from bucketserve_client.client import build_inputs

from tests.waiting import wait_for

MODELS = ("bucketserve", "bucketserve_continuous", "bucketserve_fcfs_static")
WORDS = ("serve model token batch bucket memory queue latency stream python triton request "
         "padding decode prefill cache length priority deadline engine thread").split()


def prompts(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    # from a couple of words to several hundred tokens, shuffled so long and short arrive together
    sizes = [2 + int(300 * (i / (n - 1)) ** 2) for i in range(n)]
    rng.shuffle(sizes)
    return [" ".join(rng.choice(WORDS) for _ in range(size)) for size in sizes]


@pytest.mark.parametrize("model", MODELS)
def test_32_concurrent_requests_match_transformers_greedy(server, tokenizer, reference, model):
    """The correctness test, under each scheduling policy: padding, position ids, attention masks
    and the order requests are batched in must not change any token."""
    cases = [(p, 4 + (i * 7) % 37) for i, p in enumerate(prompts(32))]
    lengths = [len(tokenizer(p).input_ids) for p, _ in cases]
    assert max(lengths) > 20 * min(lengths)
    client = BucketServeClient(server.grpc_url, model)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda c: client.generate(c[0], max_tokens=c[1], temperature=0), cases))
    mismatches = []
    for (prompt, max_tokens), got in zip(cases, results):
        ids = tokenizer(prompt).input_ids
        want = reference(ids, max_tokens)
        if (got.text, got.num_output_tokens) != (tokenizer.decode(want, skip_special_tokens=True), len(want)):
            mismatches.append((len(ids), max_tokens))
    assert not mismatches, f"{len(mismatches)}/32 differ from transformers (prompt len, max_tokens): {mismatches}"


@pytest.mark.parametrize("stream", [True, False])
def test_cancellation_answers_cancelled_and_frees_the_sequence(server, stream):
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("bucketserve", build_inputs("tell me everything", stream,
                                                          {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}))
    if stream:
        for _ in range(3):
            assert results.get(timeout=60)[1] is None
    wait_for(lambda: server.metric("bucketserve_kv_cache_bytes") > 0)
    assert server.metric("bucketserve_requests_running") == 1
    # what an inference gateway routes on: nothing queued, part of the KV budget in use
    assert server.metric("bucketserve_num_requests_waiting") == 0
    assert 0 < server.metric("bucketserve_kv_cache_usage_perc") < 1
    client.stop_stream(cancel_requests=True)
    received = []
    while not results.empty():
        received.append(results.get()[1])
    errors = [e for e in received if e is not None]
    assert len(errors) == 1 and "CANCELLED" in str(errors[0].status()), received
    wait_for(lambda: server.metric("bucketserve_requests_running") == 0
             and server.metric("bucketserve_kv_cache_bytes") == 0 and server.metric("bucketserve_kv_cache_usage_perc") == 0)
    assert BucketServeClient(server.grpc_url).generate("still there?", max_tokens=3).num_output_tokens == 3


def test_an_http_client_leaving_generate_stream_cancels_its_sequence(server):
    """Triton's HTTP frontend tells the model when a generate_stream client hangs up."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http, timeout=60)
    body = {"text_input": "tell me everything", "max_tokens": 1500, "ignore_eos": True, "temperature": 0,
            "stream": True}
    try:
        conn.request("POST", "/v2/models/bucketserve/generate_stream", json.dumps(body),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        for _ in range(3):  # three server-sent events: it is generating
            while not response.fp.readline().startswith(b"data:"):
                pass
        wait_for(lambda: server.metric("bucketserve_kv_cache_bytes") > 0)
        assert server.metric("bucketserve_requests_running") == 1
        conn.sock.shutdown(socket.SHUT_RDWR)
    finally:
        conn.close()
    # 1,500 tokens take tens of seconds here: freed within a few seconds means cancelled, not finished
    wait_for(lambda: server.metric("bucketserve_requests_running") == 0
             and server.metric("bucketserve_kv_cache_bytes") == 0, timeout=10)
    assert BucketServeClient(server.grpc_url).generate("still there?", max_tokens=3).num_output_tokens == 3


def raw_request(client: grpcclient.InferenceServerClient, inputs: list[tuple[str, np.ndarray, str]]):
    """Send arbitrary tensors on a fresh stream; return (error, final responses received)."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    tensors = []
    for name, value, dtype in inputs:
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        tensors.append(t)
    client.async_stream_infer("bucketserve", tensors, enable_empty_final_response=True)
    result, error = results.get(timeout=60)
    client.stop_stream()
    return error, results.qsize()


def s(text: str | bytes) -> tuple:
    return np.array([text.encode() if isinstance(text, str) else text], dtype=np.object_), "BYTES"


BAD_INPUTS = [
    ("missing text_input", [("stream", np.array([False]), "BOOL")], "text_input"),
    ("empty prompt", [("text_input", *s(""))], "text_input is empty"),
    ("invalid UTF-8", [("text_input", *s(b"\xc3\x28"))], "not valid UTF-8"),
    ("prompt beyond the context", [("text_input", *s("word " * 5000))], "longer than the context"),
    ("max_tokens 0", [("text_input", *s("hi")), ("max_tokens", np.array([0], dtype=np.int32), "INT32")],
     "max_tokens must be >= 1"),
    ("max_tokens beyond the context", [("text_input", *s("hi")), ("max_tokens", np.array([10**6], dtype=np.int32), "INT32")],
     "beyond the context"),
    ("malformed JSON", [("text_input", *s("hi")), ("sampling_parameters", *s("{oops"))], "not valid JSON"),
    ("unknown sampling key", [("text_input", *s("hi")), ("sampling_parameters", *s('{"beam": 2}'))], "unknown key 'beam'"),
    ("wrong type in JSON", [("text_input", *s("hi")), ("sampling_parameters", *s('{"top_k": "x"}'))], "must be an integer"),
    ("wrong tensor dtype", [("text_input", *s("hi")), ("max_tokens", np.array([1.5], dtype=np.float32), "FP32")],
     "max_tokens"),
    ("negative temperature", [("text_input", *s("hi")), ("temperature", np.array([-1], dtype=np.float32), "FP32")],
     "temperature must be >= 0"),
    ("top_p above 1", [("text_input", *s("hi")), ("top_p", np.array([1.01], dtype=np.float32), "FP32")], "top_p"),
    ("top_p zero", [("text_input", *s("hi")), ("top_p", np.array([0], dtype=np.float32), "FP32")], "top_p"),
    ("negative top_k", [("text_input", *s("hi")), ("top_k", np.array([-2], dtype=np.int32), "INT32")], "top_k"),
    ("unknown priority", [("text_input", *s("hi")), ("priority", np.array([9], dtype=np.int32), "INT32")], "priority"),
]


def test_bad_inputs_get_invalid_arg_while_a_good_request_completes(server, tokenizer, reference):
    good_prompt = "A good request that runs while bad ones arrive"
    want = tokenizer.decode(reference(tokenizer(good_prompt).input_ids, 48), skip_special_tokens=True)
    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(BucketServeClient(server.grpc_url).generate, good_prompt, max_tokens=48, temperature=0)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        for name, inputs, message in BAD_INPUTS:
            error, extra = raw_request(client, inputs)
            # gRPC stream responses carry the error message only; HTTP below checks the status code
            assert error is not None, name
            assert message in error.message(), (name, error.message())
            assert extra == 0, f"{name}: more than one response"
        assert good.result(timeout=120).text == want
    assert server.proc.poll() is None


HTTP_BAD_BODIES = [
    ({"max_tokens": 4}, "text_input"),
    ({"text_input": ""}, "text_input is empty"),
    ({"text_input": "word " * 5000}, "longer than the context"),
    ({"text_input": "hi", "max_tokens": 0}, "max_tokens must be >= 1"),
    ({"text_input": "hi", "sampling_parameters": "{oops"}, "not valid JSON"),
    ({"text_input": "hi", "sampling_parameters": '{"n": 2}'}, "unknown key 'n'"),
    ({"text_input": "hi", "temperature": -0.1}, "temperature must be >= 0"),
    ({"text_input": "hi", "top_k": -1}, "top_k must be >= 0"),
    ({"text_input": "hi", "min_tokens": 100, "max_tokens": 10}, "min_tokens must be between"),
    ({"text_input": "hi", "max_tokenz": 10}, "unknown key 'max_tokenz'"),
]


def test_http_bad_inputs_are_400_with_the_reason(server):
    for body, message in HTTP_BAD_BODIES:
        status, raw = server.post("/v2/models/bucketserve/generate", body)
        assert status == 400 and message in raw, (body, status, raw)
