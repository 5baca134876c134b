"""Request parameters as vLLM names them (``max_tokens``, ``temperature``, ``stop``, the penalties,
``logprobs``, ``priority``, ``slo_ms``, ...), from any JSON-like mapping, into ``SamplingParams``: a clear ``InvalidInput`` for
every bad key or value. JSON numbers may arrive as strings, as genai-perf sends them.

Shared by the Triton adapter (``sampling_parameters`` and request parameters) and the offline
``bucketserve generate`` (one JSON object per line).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np

from bucketserve.engine.request import InvalidInput, Priority, SamplingParams, check_slo_ms


def to_int(name: str, value: Any) -> int:
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


def to_float(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise InvalidInput(f"{name} must be a number, got a boolean")
    try:
        number = float(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InvalidInput(f"{name} must be finite, got {value!r}")
    return number


def to_bool(name: str, value: Any) -> bool:
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


def to_stop(name: str, value: Any) -> tuple[str, ...]:
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


def to_token_ids(name: str, value: Any) -> tuple[int, ...]:
    items = [value] if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple, np.ndarray)):
        raise InvalidInput(f"{name} must be a list of token ids, got {value!r}")
    return tuple(to_int(name, item) for item in items)


def to_optional_int(name: str, value: Any) -> int | None:
    return None if value is None else to_int(name, value)


# name in sampling_parameters / request parameters -> (field, converter)
SAMPLING_KEYS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "max_tokens": ("max_tokens", to_int),
    "min_tokens": ("min_tokens", to_int),
    "temperature": ("temperature", to_float),
    "top_k": ("top_k", to_int),
    "top_p": ("top_p", to_float),
    "seed": ("seed", to_int),
    "stop": ("stop", to_stop),
    "stop_token_ids": ("stop_token_ids", to_token_ids),
    "ignore_eos": ("ignore_eos", to_bool),
    "presence_penalty": ("presence_penalty", to_float),
    "frequency_penalty": ("frequency_penalty", to_float),
    "repetition_penalty": ("repetition_penalty", to_float),
    "logprobs": ("logprobs", to_optional_int),
    "priority": ("priority", to_int),
    "slo_ms": ("slo_ms", to_int),
}


def from_mapping(source: str, mapping: Mapping[str, Any], ignore_prefix: str | None = None) -> dict[str, Any]:
    """Convert every key of ``mapping`` (``source`` names it in errors); unknown keys are errors."""
    values: dict[str, Any] = {}
    for key, raw in mapping.items():
        if ignore_prefix and key.startswith(ignore_prefix):
            continue
        if key not in SAMPLING_KEYS:
            raise InvalidInput(f"unknown key {key!r} in {source}; known: {', '.join(sorted(SAMPLING_KEYS))}")
        field, convert = SAMPLING_KEYS[key]
        values[field] = convert(f"{source}.{key}", raw)
    return values


def request_fields(values: dict[str, Any], default_max_tokens: int,
                   default_temperature: float) -> tuple[SamplingParams, Priority, int | None]:
    """Sampling parameters, priority and slo_ms from converted ``values`` (the server's defaults where absent)."""
    values = dict(values)
    priority = Priority.parse(values.pop("priority", Priority.ONLINE))
    slo_ms = values.pop("slo_ms", None)
    check_slo_ms(slo_ms)
    values.setdefault("max_tokens", default_max_tokens)
    values.setdefault("temperature", default_temperature)
    return SamplingParams(**values), priority, slo_ms
