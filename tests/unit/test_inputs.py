"""Request parsing: precedence of the three sources, coercion, and every INVALID_ARG case."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bucketserve.engine.request import InvalidInput
from bucketserve.engine.tokenizer import check_lengths, check_prompt_bytes
from bucketserve.triton.inputs import parse_request
from tests.bad_inputs import CASES


def text(s: str | bytes) -> np.ndarray:
    return np.array([s.encode() if isinstance(s, str) else s], dtype=np.object_)


def parse(tensors: dict, params: dict | None = None):
    return parse_request({"text_input": text("hi"), **tensors}, params or {}, default_max_tokens=16,
                         default_temperature=1.0)


def test_defaults_follow_vllm_backend():
    p = parse({})
    assert p.sampling.max_tokens == 16 and p.sampling.temperature == 1.0
    assert not p.options.stream and not p.options.exclude_input_in_output  # prompt prepended
    assert parse({"stream": np.array([True])}).options.exclude_input_in_output  # not when streaming


def test_precedence_tensor_over_json_over_parameters():
    sp = text(json.dumps({"max_tokens": 7, "temperature": 0.5, "top_k": 3}))
    p = parse({"sampling_parameters": sp, "max_tokens": np.array([9], dtype=np.int32)},
              {"max_tokens": 5, "temperature": 0.1, "top_p": 0.9})
    assert p.sampling.max_tokens == 9  # tensor
    assert p.sampling.temperature == 0.5  # JSON over parameters
    assert p.sampling.top_k == 3
    assert p.sampling.top_p == pytest.approx(0.9)  # parameters when nothing else names it


def test_numbers_as_strings_like_genai_perf():
    p = parse({"sampling_parameters": text('{"max_tokens": "64", "min_tokens": "64", "ignore_eos": "true"}')})
    assert (p.sampling.max_tokens, p.sampling.min_tokens, p.sampling.ignore_eos) == (64, 64, True)


def test_trtllm_names_and_stop_words():
    p = parse({"min_length": np.array([2], dtype=np.int32), "max_tokens": np.array([5], dtype=np.int32),
               "stop_words": np.array([b"foo", b"bar"], dtype=np.object_), "seed": np.array([7], dtype=np.uint64)})
    assert p.sampling.min_tokens == 2 and p.sampling.stop == ("foo", "bar") and p.sampling.seed == 7


def test_triton_internal_parameters_are_ignored():
    assert parse({}, {"triton_enable_empty_final_response": True}).sampling.max_tokens == 16


@pytest.mark.parametrize("case", [c for c in CASES if c.parsed and c.grpc], ids=lambda c: c.name)
def test_bad_input_names_what_is_wrong(case):
    with pytest.raises(InvalidInput) as info:
        parse_request(case.arrays(), case.parameters, default_max_tokens=16, default_temperature=1.0)
    assert case.message in str(info.value)


def test_missing_prompt():
    with pytest.raises(InvalidInput, match="text_input is required"):
        parse_request({}, {}, 16, 1.0)


def test_lengths_must_fit_the_context():
    check_lengths(10, 90, 100)
    with pytest.raises(InvalidInput, match="longer than the context"):
        check_lengths(100, 1, 100)
    with pytest.raises(InvalidInput, match="beyond the context"):
        check_lengths(10, 91, 100)


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(tokenizer):
    max_token_bytes = max(len(t.encode("utf-8")) for t in tokenizer.get_vocab())
    # the bound is safe: text built of the longest-spelled tokens still has at least bytes / bound tokens
    longest = max(tokenizer.get_vocab(), key=lambda t: len(t.encode("utf-8")))
    text = tokenizer.convert_tokens_to_string([longest] * 50)
    assert len(tokenizer(text, add_special_tokens=False).input_ids) >= len(text.encode()) / max_token_bytes
    check_prompt_bytes("x" * (100 * max_token_bytes), 100, max_token_bytes)
    with pytest.raises(InvalidInput, match=f"prompt is {100 * max_token_bytes + 2} bytes: more than the 100-token"):
        check_prompt_bytes("é" * (50 * max_token_bytes + 1), 100, max_token_bytes)
