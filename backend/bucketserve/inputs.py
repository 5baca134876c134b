"""Turn a request's inputs into sampling and output options, or a clear INVALID_ARG message.

Three sources, highest precedence first: explicit input tensors, the ``sampling_parameters``
JSON (vllm_backend's way), then the request's parameters (what Triton's generate endpoint makes
of extra JSON keys). JSON numbers may arrive as strings, as genai-perf sends them.
Plain Python: the Triton adapter hands in numpy arrays; tests hand in the same.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from bucketserve.request import OutputOptions, SamplingParams

PRIORITY_CLASSES = (0, 1)  # 0: online (latency-sensitive), 1: offline


class InvalidInput(ValueError):
    """The request is malformed; the message says what is wrong and goes back to the client."""


def _to_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise InvalidInput(f"{name} must be an integer, got a boolean")
    if isinstance(value, (bytes, str)):
        text = value.decode() if isinstance(value, bytes) else value
        try:
            return int(text.strip())
        except ValueError:
            raise InvalidInput(f"{name} must be an integer, got {text!r}") from None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    raise InvalidInput(f"{name} must be an integer, got {value!r}")


def _to_float(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise InvalidInput(f"{name} must be a number, got a boolean")
    try:
        number = float(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InvalidInput(f"{name} must be finite, got {value!r}")
    return number


def _to_bool(name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (bytes, str)):
        text = (value.decode() if isinstance(value, bytes) else value).strip().lower()
        if text in ("true", "1"):
            return True
        if text in ("false", "0"):
            return False
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise InvalidInput(f"{name} must be a boolean, got {value!r}")


def _to_stop(name: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, (str, bytes)) else value
    if not isinstance(items, (list, tuple, np.ndarray)):
        raise InvalidInput(f"{name} must be a string or a list of strings, got {value!r}")
    words = []
    for item in items:
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"{name} must be UTF-8 text") from None
        if not isinstance(item, str):
            raise InvalidInput(f"{name} must be a string or a list of strings, got {value!r}")
        if item:
            words.append(item)
    return tuple(words)


# name in sampling_parameters / request parameters -> (field, converter)
SAMPLING_KEYS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "max_tokens": ("max_tokens", _to_int),
    "min_tokens": ("min_tokens", _to_int),
    "temperature": ("temperature", _to_float),
    "top_k": ("top_k", _to_int),
    "top_p": ("top_p", _to_float),
    "seed": ("seed", _to_int),
    "stop": ("stop", _to_stop),
    "ignore_eos": ("ignore_eos", _to_bool),
    "priority": ("priority", _to_int),
    "slo_ms": ("slo_ms", _to_int),
}

# input tensor name -> (field, converter); TRT-LLM names included, so genai-perf works unchanged
TENSOR_KEYS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "max_tokens": ("max_tokens", _to_int),
    "min_tokens": ("min_tokens", _to_int),
    "min_length": ("min_tokens", _to_int),
    "temperature": ("temperature", _to_float),
    "top_k": ("top_k", _to_int),
    "top_p": ("top_p", _to_float),
    "seed": ("seed", _to_int),
    "ignore_eos": ("ignore_eos", _to_bool),
    "priority": ("priority", _to_int),
    "slo_ms": ("slo_ms", _to_int),
    "stop_words": ("stop", _to_stop),
}

OPTION_TENSORS = (
    "stream",
    "exclude_input_in_output",
    "return_finish_reason",
    "return_num_input_tokens",
    "return_num_output_tokens",
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


def _from_mapping(source: str, mapping: Mapping[str, Any], ignore_prefix: str | None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, raw in mapping.items():
        if ignore_prefix and key.startswith(ignore_prefix):
            continue
        if key not in SAMPLING_KEYS:
            raise InvalidInput(f"unknown key {key!r} in {source}; known: {', '.join(sorted(SAMPLING_KEYS))}")
        field, convert = SAMPLING_KEYS[key]
        values[field] = convert(f"{source}.{key}", raw)
    return values


def decode_prompt(array: np.ndarray | None) -> str:
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
    if not raw:
        raise InvalidInput("text_input is empty")
    return raw


@dataclass(frozen=True)
class ParsedInput:
    prompt: str
    sampling: SamplingParams
    options: OutputOptions
    priority: int
    slo_ms: int | None


def parse_request(
    tensors: Mapping[str, np.ndarray],
    request_parameters: Mapping[str, Any],
    default_max_tokens: int,
    default_temperature: float,
) -> ParsedInput:
    """Merge the three sources (tensors > sampling_parameters > request parameters) and validate."""
    prompt = decode_prompt(tensors.get("text_input"))
    values = _from_mapping("parameters", request_parameters, ignore_prefix="triton_")
    if "sampling_parameters" in tensors:
        raw = _scalar("sampling_parameters", tensors["sampling_parameters"])
        values.update(_from_mapping("sampling_parameters", _parse_json_object("sampling_parameters", raw), None))
    for name, (field, convert) in TENSOR_KEYS.items():
        if name in tensors:
            array = tensors[name]
            raw = array.reshape(-1) if field == "stop" else _scalar(name, array)
            values[field] = convert(name, raw)
    flags = {name: _to_bool(name, _scalar(name, tensors[name])) for name in OPTION_TENSORS if name in tensors}
    stream = flags.pop("stream", False)
    # vllm_backend's default: the prompt is prepended unless streaming or told otherwise
    exclude = flags.pop("exclude_input_in_output", stream)
    if stream and not exclude:
        raise InvalidInput("exclude_input_in_output=false is not allowed when streaming")
    options = OutputOptions(stream=stream, exclude_input_in_output=exclude, **flags)

    priority = values.pop("priority", 0)
    slo_ms = values.pop("slo_ms", None)
    values.setdefault("max_tokens", default_max_tokens)
    values.setdefault("temperature", default_temperature)
    sampling = SamplingParams(**values)
    _validate(sampling, priority, slo_ms)
    return ParsedInput(prompt, sampling, options, priority, slo_ms)


def _validate(s: SamplingParams, priority: int, slo_ms: int | None) -> None:
    if s.max_tokens < 1:
        raise InvalidInput(f"max_tokens must be >= 1, got {s.max_tokens}")
    if not 0 <= s.min_tokens <= s.max_tokens:
        raise InvalidInput(f"min_tokens must be between 0 and max_tokens ({s.max_tokens}), got {s.min_tokens}")
    if s.temperature < 0:
        raise InvalidInput(f"temperature must be >= 0, got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise InvalidInput(f"top_p must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise InvalidInput(f"top_k must be >= 0 (0 disables it), got {s.top_k}")
    if s.seed is not None and not 0 <= s.seed < 2**64:
        raise InvalidInput(f"seed must be in [0, 2**64), got {s.seed}")
    if priority not in PRIORITY_CLASSES:
        raise InvalidInput(f"priority must be one of {PRIORITY_CLASSES} (0 online, 1 offline), got {priority}")
    if slo_ms is not None and slo_ms < 1:
        raise InvalidInput(f"slo_ms must be >= 1, got {slo_ms}")


def check_prompt_bytes(prompt: str, max_model_len: int, max_token_bytes: int) -> None:
    """Refuse, before tokenizing it, a prompt too many bytes long to fit the context in any tokenization:
    each token covers at most ``max_token_bytes`` bytes, so such a prompt has more tokens than the context."""
    size = len(prompt.encode("utf-8"))
    limit = max_model_len * max_token_bytes
    if size > limit:
        raise InvalidInput(f"prompt is {size} bytes: more than the {max_model_len}-token context can hold "
                           f"(at most {limit} bytes with this tokenizer)")


def check_lengths(prompt_len: int, max_tokens: int, max_model_len: int) -> None:
    """Prompt and output must fit the context, or the request could never finish."""
    if prompt_len >= max_model_len:
        raise InvalidInput(f"prompt is {prompt_len} tokens, longer than the context allows ({max_model_len - 1})")
    if prompt_len + max_tokens > max_model_len:
        raise InvalidInput(
            f"max_tokens {max_tokens} is beyond the context: prompt {prompt_len} + max_tokens must be <= {max_model_len}"
        )
