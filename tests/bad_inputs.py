"""Every malformed request the suite sends, in one table: each case once, with the error it must get.

A case names Triton input tensors and, optionally, request parameters (what Triton's HTTP generate
endpoint makes of extra JSON keys). The unit test feeds the parsable ones to ``parse_request``
directly; the integration test sends every case over gRPC and those with an ``http`` status as an
HTTP generate body; the stress run draws from the cases that are a ``sampling_parameters`` dict alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

GOOD = "The history of the city begins with"
HUGE = "word " * 5000  # ~5,000 tokens: beyond the 2,048-token context
DTYPES = {"BOOL": np.bool_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "UINT64": np.uint64}


@dataclass(frozen=True)
class Case:
    name: str
    message: str
    """The error must contain this."""
    tensors: dict[str, tuple[Any, str]] = field(default_factory=dict)
    """Input name -> (values, Triton dtype); ``text_input`` is GOOD unless named here (or set to None)."""
    sampling: dict[str, Any] | str | None = None
    """The ``sampling_parameters`` tensor: a JSON object, or raw text."""
    parameters: dict[str, Any] = field(default_factory=dict)
    """Request parameters (top-level keys of an HTTP generate body)."""
    parsed: bool = True
    """``parse_request`` alone refuses it (False: the engine or Triton itself does, with the server's context)."""
    http: int | None = None
    """Also sent to HTTP's generate endpoint, expecting this status."""
    http_raw: bytes | None = None
    """The HTTP body as raw bytes, instead of one built from the case."""
    grpc: bool = True

    def arrays(self) -> dict[str, np.ndarray]:
        """The case's input tensors as numpy arrays, as Triton hands them to the model."""
        tensors = {"text_input": ([GOOD.encode()], "BYTES"), **self.tensors}
        if self.sampling is not None:
            raw = self.sampling if isinstance(self.sampling, str) else json.dumps(self.sampling)
            tensors["sampling_parameters"] = ([raw.encode()], "BYTES")
        return {name: to_array(values, dtype) for name, (values, dtype) in tensors.items() if values is not None}

    def http_body(self) -> bytes:
        if self.http_raw is not None:
            return self.http_raw
        prompt = self.tensors.get("text_input", ([GOOD.encode()], "BYTES"))[0]
        body: dict[str, Any] = {} if prompt is None else {"text_input": prompt[0].decode()}
        body.update(self.parameters)
        if isinstance(self.sampling, dict):
            body.update(self.sampling)
        elif self.sampling is not None:
            body["sampling_parameters"] = self.sampling
        return json.dumps(body).encode()

    @property
    def sampling_only(self) -> bool:
        return isinstance(self.sampling, dict) and not self.tensors and not self.parameters and self.parsed


def to_array(values: Any, dtype: str) -> np.ndarray:
    if dtype == "BYTES":
        return np.array(values, dtype=np.object_)
    return np.asarray(values).astype(DTYPES[dtype])


def sampling(name: str, values: dict[str, Any] | str, message: str, **kw: Any) -> Case:
    return Case(name, message, sampling=values, **kw)


def tensor(name: str, input_name: str, values: Any, dtype: str, message: str, **kw: Any) -> Case:
    return Case(name, message, tensors={input_name: (values, dtype)}, **kw)


CASES: list[Case] = [
    Case("missing text_input", "text_input", tensors={"text_input": (None, "BYTES")}, sampling={"max_tokens": 4},
         http=400),
    tensor("text_input as INT32", "text_input", [7], "INT32", "text_input"),
    tensor("text_input with two elements", "text_input", [b"a", b"b"], "BYTES", "text_input"),
    tensor("empty prompt", "text_input", [b""], "BYTES", "text_input is empty", http=400),
    tensor("invalid UTF-8 prompt", "text_input", [b"\xff\xfe\xfd"], "BYTES", "text_input is not valid UTF-8"),
    tensor("prompt beyond the context", "text_input", [HUGE.encode()], "BYTES", "longer than the context allows",
           parsed=False),
    tensor("a megabyte of prompt", "text_input", [b"x" * 1_000_000], "BYTES",
           "more than the 2048-token context can hold", parsed=False),
    sampling("sampling_parameters not JSON", "{max_tokens: 4", "sampling_parameters is not valid JSON", http=400),
    sampling("sampling_parameters a JSON array", "[1, 2]", "must be a JSON object, got list"),
    sampling("unknown sampling key", {"beam_width": 4}, "unknown key 'beam_width'"),
    sampling("negative max_tokens", {"max_tokens": -5}, "max_tokens must be >= 1", http=400),
    sampling("absurd max_tokens", {"max_tokens": 10**9}, "max_tokens 1000000000 is beyond the context", parsed=False),
    sampling("max_tokens not a number", {"max_tokens": "many"}, "max_tokens must be an integer"),
    sampling("max_tokens a boolean", {"max_tokens": True}, "max_tokens must be an integer, got a boolean"),
    sampling("max_tokens a fraction", {"max_tokens": 1.5}, "max_tokens must be an integer"),
    sampling("negative temperature", {"temperature": -1}, "temperature must be >= 0"),
    sampling("temperature NaN", {"temperature": "nan"}, "temperature must be finite"),
    sampling("temperature a word", {"temperature": "hot"}, "temperature must be a number"),
    sampling("top_p zero", {"top_p": 0}, "top_p must be in (0, 1]"),
    sampling("top_p above one", {"top_p": 1.5}, "top_p must be in (0, 1]"),
    sampling("negative top_k", {"top_k": -1}, "top_k must be >= 0"),
    sampling("negative seed", {"seed": -1}, "seed must be in [0, 2**64)"),
    sampling("min_tokens above max_tokens", {"max_tokens": 4, "min_tokens": 9}, "min_tokens must be between 0 and max_tokens"),
    sampling("stop of the wrong type", {"stop": 5}, "stop must be a string or a list of strings"),
    sampling("stop list holding a number", {"stop": ["a", 3]}, "must be a string or a list of strings"),
    sampling("unknown priority class", {"priority": 7}, "priority must be one of (0, 1)", http=400),
    sampling("priority not a number", {"priority": "gold"}, "priority must be an integer"),
    sampling("slo_ms zero", {"slo_ms": 0}, "slo_ms must be >= 1"),
    sampling("ignore_eos not a boolean", {"ignore_eos": "maybe"}, "ignore_eos must be a boolean"),
    sampling("presence_penalty beyond 2", {"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]", http=400),
    sampling("frequency_penalty below -2", {"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2]"),
    sampling("repetition_penalty zero", {"repetition_penalty": 0}, "repetition_penalty must be > 0"),
    sampling("logprobs beyond 20", {"logprobs": 21}, "logprobs must be between 0 and 20", http=400),
    sampling("stop_token_ids of words", {"stop_token_ids": ["eos"]}, "stop_token_ids must be an integer"),
    sampling("negative stop_token_ids", {"stop_token_ids": [-1]}, "stop_token_ids must be token ids >= 0"),
    tensor("max_tokens tensor zero", "max_tokens", [0], "INT32", "max_tokens must be >= 1"),
    tensor("min_tokens tensor above the default max_tokens", "min_tokens", [20], "INT32", "min_tokens must be between"),
    tensor("temperature tensor NaN", "temperature", [np.nan], "FP32", "must be finite"),
    tensor("top_p tensor zero", "top_p", [0.0], "FP32", "top_p must be in (0, 1]"),
    tensor("priority tensor out of range", "priority", [5], "INT32", "priority must be one of"),
    tensor("slo_ms tensor zero", "slo_ms", [0], "INT32", "slo_ms must be >= 1"),
    tensor("stop_words as INT32", "stop_words", [1, 2], "INT32", "stop_words"),
    tensor("negative prompt_token_ids", "prompt_token_ids", [5, -1], "INT64", "prompt_token_ids must be >= 0"),
    tensor("prompt_token_ids beyond the vocabulary", "prompt_token_ids", [5, 10**9], "INT64", "is not in the vocabulary",
           parsed=False),
    # Triton checks shapes against the config before the model sees the request
    tensor("max_tokens tensor with two elements", "max_tokens", [4, 5], "INT32", "unexpected shape for input 'max_tokens'",
           parsed=False),
    tensor("stream tensor as BYTES", "stream", [b"yes"], "BYTES", "stream"),
    Case("echo while streaming", "exclude_input_in_output=false is not allowed when streaming",
         tensors={"stream": ([True], "BOOL"), "exclude_input_in_output": ([False], "BOOL")}),
    Case("unknown request parameter", "unknown key 'beam_width' in parameters", parameters={"beam_width": 2}, http=400),
    Case("stop parameter of the wrong type", "parameters.stop must be a string or a list", parameters={"stop": 5},
         http=400),
    # Triton's generate endpoint answers a body that is not JSON itself, with 500, before the model sees it
    Case("HTTP body not JSON", "failed to parse the request JSON buffer", parsed=False, grpc=False, http=500,
         http_raw=b"{text_input: hi"),
]
