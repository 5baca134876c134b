"""OpenAI's API through `bucketserve serve --openai-port`, driven by the official `openai` client: chat and
completions, streamed and not, logprobs, stop, usage, and errors arriving as the SDK's own exceptions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from bucketserve.openai.gateway import API_KEY_ENV

from tests.waiting import wait_for

from .conftest import free_ports

MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a prime number."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.openai}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def greedy(hf, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_chat_equals_transformers_on_the_templated_prompt(client, hf, tokenizer):
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    want = tokenizer.decode(greedy(hf, list(ids), 10), skip_special_tokens=True)
    chat = client.chat.completions.create(model="bucketserve", messages=MESSAGES, max_tokens=10, temperature=0)
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want
    assert choice.finish_reason == "length" and chat.object == "chat.completion"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(ids), 10)
    chunks = list(client.chat.completions.create(model="bucketserve", messages=MESSAGES, max_completion_tokens=10,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].object == "chat.completion.chunk"


def test_chat_logprobs_name_each_token_and_its_alternatives(client):
    chat = client.chat.completions.create(model="bucketserve", messages=MESSAGES, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and "".join(t.token for t in content) == chat.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 2 and token.top_logprobs[0].token == token.token  # greedy: the best one
        assert token.top_logprobs[0].logprob == token.logprob >= token.top_logprobs[1].logprob


def test_completions_from_text_or_token_ids_with_echo_stop_and_logprobs(client, hf, tokenizer):
    prompt = "def add(a, b):\n    return"
    ids = tokenizer(prompt).input_ids
    want = tokenizer.decode(greedy(hf, ids, 8), skip_special_tokens=True)
    text = client.completions.create(model="bucketserve", prompt=prompt, max_tokens=8, temperature=0)
    assert text.choices[0].text == want and text.usage.prompt_tokens == len(ids)
    assert client.completions.create(model="bucketserve", prompt=ids, max_tokens=8, temperature=0).choices[0].text == want
    echoed = client.completions.create(model="bucketserve", prompt=prompt, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + want
    streamed = client.completions.create(model="bucketserve", prompt=prompt, max_tokens=8, temperature=0, echo=True,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == prompt + want
    stop = want.strip()[:2]
    stopped = client.completions.create(model="bucketserve", prompt=prompt, max_tokens=8, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == want[:want.index(stop)]
    scored = client.completions.create(model="bucketserve", prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    lp = scored.choices[0].logprobs
    assert "".join(lp.tokens) == scored.choices[0].text and len(lp.token_logprobs) == 4
    assert all(len(top) == 3 and max(top.values()) == p for top, p in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_errors_arrive_as_the_sdks_exceptions(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="top_p must be in"):
        client.completions.create(model="bucketserve", prompt="hi", top_p=3)
    with pytest.raises(openai.BadRequestError, match="unsupported parameter 'tools'|tools="):
        client.chat.completions.create(model="bucketserve", messages=MESSAGES,
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.BadRequestError, match="unsupported parameter 'guided_json'"):
        client.completions.create(model="bucketserve", prompt="hi", extra_body={"guided_json": {}})
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        client.completions.create(model="bucketserve", prompt="hi", n=2)
    # a first token that cannot come within slo_ms: the server's deadline, worth a retry later
    with pytest.raises(openai.InternalServerError, match="deadline exceeded") as late:
        client.completions.create(model="bucketserve", prompt="hi " * 500, max_tokens=4, extra_body={"slo_ms": 1})
    assert late.value.status_code == 503 and late.value.response.headers["Retry-After"] == "1"


def test_health_answers_without_a_key(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.openai}/health", timeout=10) as r:
        assert r.status == 200 and json.load(r)["status"] == "ok"


def test_an_api_key_is_required_when_set(server, model_dir, tmp_path):
    (port,) = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-m", "bucketserve.cli", "openai-gateway", "--url", server.grpc_url,
                             "--port", str(port), "--tokenizer", str(model_dir)],
                            env={**os.environ, API_KEY_ENV: "s3cret"}, stdout=(tmp_path / "log").open("w"),
                            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/health"), timeout=60, what="the gateway answers")
        url = f"http://127.0.0.1:{port}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert [m.id for m in keyed.models.list()][0] == "bucketserve"
    finally:
        proc.terminate()
        proc.wait(30)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False
