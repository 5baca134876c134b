"""Streaming and one-shot generation over gRPC and HTTP, checked against transformers' output."""

from __future__ import annotations

import asyncio
import json

import pytest

from bucketserve_client import AsyncBucketServeClient, BucketServeClient

PROMPT = "The history of the city begins with"


def expected_text(tokenizer, reference, prompt: str, max_tokens: int) -> tuple[str, int, int]:
    ids = tokenizer(prompt).input_ids
    out = reference(ids, max_tokens)
    return tokenizer.decode(out, skip_special_tokens=True), len(ids), len(out)


def test_grpc_stream_and_one_shot_match_transformers(server, tokenizer, reference):
    text, n_in, n_out = expected_text(tokenizer, reference, PROMPT, 24)
    client = BucketServeClient(server.grpc_url)
    # how many responses the text comes in depends on how far the response thread lags behind the engine (a
    # lagging stream gets one response for all it missed; test_pacing checks the spacing): not asserted here
    deltas = list(client.stream(PROMPT, max_tokens=24, temperature=0))
    assert deltas and "".join(deltas) == text
    done = client.generate(PROMPT, max_tokens=24, temperature=0)
    assert (done.text, done.num_input_tokens, done.num_output_tokens) == (text, n_in, n_out)
    assert done.finish_reason == "length"
    assert client.generate(PROMPT, echo=True, max_tokens=24, temperature=0).text == PROMPT + text


def test_asyncio_client(server, tokenizer, reference):
    text, _, _ = expected_text(tokenizer, reference, PROMPT, 10)

    async def run() -> tuple[str, str]:
        client = AsyncBucketServeClient(server.grpc_url)
        streamed = "".join([d async for d in client.stream(PROMPT, max_tokens=10, temperature=0)])
        return streamed, (await client.generate(PROMPT, max_tokens=10, temperature=0)).text

    assert asyncio.run(run()) == (text, text)


def test_http_generate_and_generate_stream(server, tokenizer, reference):
    text, _, _ = expected_text(tokenizer, reference, PROMPT, 12)
    body = {"text_input": PROMPT, "max_tokens": 12, "temperature": 0}
    status, raw = server.post("/v2/models/bucketserve/generate", body)
    assert status == 200 and json.loads(raw)["text_output"] == PROMPT + text  # vllm_backend: prompt prepended
    status, raw = server.post("/v2/models/bucketserve/generate",
                              {**body, "exclude_input_in_output": True, "return_finish_reason": True})
    assert status == 200 and json.loads(raw)["text_output"] == text and json.loads(raw)["finish_reason"] == "length"
    status, raw = server.post("/v2/models/bucketserve/generate_stream", {**body, "stream": True})
    events = [json.loads(line[len("data: "):]) for line in raw.splitlines() if line.startswith("data: ")]
    assert status == 200 and events and "".join(e["text_output"] for e in events) == text  # as many as above


def test_http_bad_input_is_a_clear_400(server):
    status, raw = server.post("/v2/models/bucketserve/generate", {"text_input": "hi", "top_p": 2.0})
    assert status == 400 and "top_p must be in (0, 1]" in raw


def test_stop_words_end_generation_early(server, tokenizer, reference):
    text, _, _ = expected_text(tokenizer, reference, PROMPT, 24)
    word = text[len(text) // 2:len(text) // 2 + 3]
    client = BucketServeClient(server.grpc_url)
    done = client.generate(PROMPT, max_tokens=24, temperature=0, stop=[word])
    assert done.finish_reason == "stop" and done.text == text[:text.index(word)]
    assert "".join(client.stream(PROMPT, max_tokens=24, temperature=0, stop=[word])) == done.text


def listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) with a socket listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_bucketserve_serve_listens_on_loopback_only_by_default(server):
    """README: the three ports listen on --address, 127.0.0.1 unless told otherwise."""
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, and as IPv4-mapped IPv6 (gRPC)
    for port in (server.http, server.grpc, server.metrics):
        addresses = listening(port)
        assert addresses and addresses <= loopback, (port, addresses)


def test_logprobs_and_penalties_as_vllm_backend_names_them(server, tokenizer, reference):
    body = {"text_input": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 2,
            "return_logprobs": True, "return_cumulative_logprob": True, "exclude_input_in_output": True}
    status, raw = server.post("/v2/models/bucketserve/generate", body)
    assert status == 200, raw
    out = json.loads(raw)
    tokens = json.loads(out["logprobs"])
    assert len(tokens) == 6
    ids = tokenizer(PROMPT).input_ids
    greedy = reference(ids, 6)
    for token, entry in zip(greedy, tokens):
        chosen = entry[str(token)]
        assert chosen["rank"] == 1 and chosen["decoded_token"] == tokenizer.decode([token])
        assert len(entry) == 2  # greedy: the chosen token is the best alternative, plus the runner-up
        assert all(alt["logprob"] <= chosen["logprob"] for alt in entry.values())
    assert out["cumulative_logprob"] == pytest.approx(sum(e[str(t)]["logprob"] for t, e in zip(greedy, tokens)), abs=1e-3)
    status, raw = server.post("/v2/models/bucketserve/generate",
                              {**body, "sampling_parameters": json.dumps({"stop_token_ids": [greedy[2]]}),
                               "return_finish_reason": True})
    assert status == 200, raw
    stopped = json.loads(raw)
    assert stopped["finish_reason"] == "stop" and len(json.loads(stopped["logprobs"])) == greedy.index(greedy[2]) + 1
