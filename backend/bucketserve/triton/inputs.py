"""Turn a Triton request's inputs into sampling parameters and output options, or a clear INVALID_ARG message.

Three sources, highest precedence first: explicit input tensors, the ``sampling_parameters``
JSON (vllm_backend's way), then the request's parameters (what Triton's generate endpoint makes
of extra JSON keys). Plain Python: the Triton adapter hands in numpy arrays; tests hand in the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from bucketserve.engine.params import SAMPLING_KEYS, from_mapping, request_fields, to_bool, to_int, to_stop
from bucketserve.engine.request import InvalidInput, Priority, SamplingParams
from bucketserve.triton.interface import INPUT_NAMES

# input tensor name -> (field, converter): sampling_parameters' keys declared as inputs, and the TRT-LLM names genai-perf sends
TENSOR_KEYS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    **{name: entry for name, entry in SAMPLING_KEYS.items() if name in INPUT_NAMES},
    "min_length": ("min_tokens", to_int),
    "stop_words": ("stop", to_stop),
}

OPTION_TENSORS = (
    "stream",
    "exclude_input_in_output",
    "return_finish_reason",
    "return_num_input_tokens",
    "return_num_output_tokens",
    "return_logprobs",
    "return_cumulative_logprob",
)


def _scalar(name: str, array: np.ndarray) -> Any:
    if array.size != 1:
        raise InvalidInput(f"input {name} must hold exactly one element, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _parse_json_object(name: str, text: str | bytes) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{name} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def decode_prompt(array: np.ndarray | None, ids_given: bool = False) -> str:
    if array is None:
        raise InvalidInput("input text_input is required")
    raw = _scalar("text_input", array)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("text_input is not valid UTF-8") from None
    if not isinstance(raw, str):
        raise InvalidInput("text_input must be a string")
    if not raw and not ids_given:
        raise InvalidInput("text_input is empty")
    return raw


def prompt_ids_of(array: np.ndarray | None) -> list[int] | None:
    if array is None:
        return None
    ids = array.reshape(-1)
    if not np.issubdtype(ids.dtype, np.integer):
        raise InvalidInput(f"prompt_token_ids must be integers, got {ids.dtype}")
    if ids.size == 0:
        raise InvalidInput("prompt_token_ids is empty")
    if int(ids.min()) < 0:
        raise InvalidInput("prompt_token_ids must be >= 0")
    return [int(i) for i in ids]


@dataclass(frozen=True)
class OutputOptions:
    """What the client wants back, beyond the text."""

    stream: bool = False
    exclude_input_in_output: bool = True
    return_finish_reason: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    return_logprobs: bool = False
    return_cumulative_logprob: bool = False


@dataclass(frozen=True)
class ParsedInput:
    prompt: str
    sampling: SamplingParams
    options: OutputOptions
    priority: Priority
    slo_ms: int | None
    prompt_ids: list[int] | None = None
    """Given as token ids: the engine uses these, ``prompt`` is only echoed."""


def parse_request(
    tensors: Mapping[str, np.ndarray],
    request_parameters: Mapping[str, Any],
    default_max_tokens: int,
    default_temperature: float,
) -> ParsedInput:
    """Merge the three sources (tensors > sampling_parameters > request parameters) and validate."""
    prompt_ids = prompt_ids_of(tensors.get("prompt_token_ids"))
    prompt = decode_prompt(tensors.get("text_input"), ids_given=prompt_ids is not None)
    values = from_mapping("parameters", request_parameters, ignore_prefix="triton_")
    if "sampling_parameters" in tensors:
        raw = _scalar("sampling_parameters", tensors["sampling_parameters"])
        values.update(from_mapping("sampling_parameters", _parse_json_object("sampling_parameters", raw), None))
    for name, (field, convert) in TENSOR_KEYS.items():
        if name in tensors:
            array = tensors[name]
            raw = array.reshape(-1) if field == "stop" else _scalar(name, array)
            values[field] = convert(name, raw)
    flags = {name: to_bool(name, _scalar(name, tensors[name])) for name in OPTION_TENSORS if name in tensors}
    stream = flags.pop("stream", False)
    # vllm_backend's default: the prompt is prepended unless streaming or told otherwise
    exclude = flags.pop("exclude_input_in_output", stream)
    if stream and not exclude:
        raise InvalidInput("exclude_input_in_output=false is not allowed when streaming")
    options = OutputOptions(stream=stream, exclude_input_in_output=exclude, **flags)
    if (options.return_logprobs or options.return_cumulative_logprob) and values.get("logprobs") is None:
        values["logprobs"] = 0  # the generated tokens' own log probabilities, no alternatives

    sampling, priority, slo_ms = request_fields(values, default_max_tokens, default_temperature)
    return ParsedInput(prompt, sampling, options, priority, slo_ms, prompt_ids)
