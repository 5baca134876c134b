"""OpenAI's request bodies into our sampling parameters, and errors into OpenAI's shape and status codes.

Every key a body may hold is either passed on (``PASSED``), allowed only at OpenAI's default
(``ONLY``), or refused by name: a parameter is never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

# OpenAI / vLLM name -> our sampling_parameters key, for both endpoints
PASSED = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
          "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
          # vLLM's extensions to OpenAI's API, and ours
          "top_k": "top_k", "min_tokens": "min_tokens", "ignore_eos": "ignore_eos",
          "repetition_penalty": "repetition_penalty", "stop_token_ids": "stop_token_ids",
          "priority": "priority", "slo_ms": "slo_ms"}
COMMON = {"model", "stream", "stream_options", "user", "max_tokens", *PASSED}
"""``user`` is an end-user id for abuse monitoring: it never changes the output."""
ONLY: dict[str, tuple[Any, ...]] = {"n": (1,), "best_of": (1,), "logit_bias": ({},), "suffix": ("",),
                                    "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",),
                                    "parallel_tool_calls": (False,), "modalities": (["text"],)}
"""Parameters accepted only at these values (or null)."""
COMPLETION_KEYS = COMMON | {"prompt", "echo", "logprobs"} | {"n", "best_of", "logit_bias", "suffix"}
CHAT_KEYS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"} | {
    "n", "logit_bias", "response_format", "tools", "tool_choice", "parallel_tool_calls", "modalities"}
OPENAI_DEFAULTS = {"max_tokens": 16, "temperature": 1.0}
CHAT_MAX_TOKENS = 256
"""Chat completions without ``max_tokens``: OpenAI then generates to the context's end; we stop here."""


class OpenAIError(Exception):
    """An error for one request, as OpenAI's SDKs expect it: their exception type follows the status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after = status, message, param, retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.status}}

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return web.json_response(self.body(), status=self.status, headers=headers)


def from_triton(message: str) -> OpenAIError:
    """The server's error for a request, by what it says: a full queue is 429 and a missed deadline or a
    server going away 503 (both worth a retry later), a failure inside the model 500, the rest bad input."""
    lowered = message.lower()
    if "overloaded" in lowered:
        return OpenAIError(429, message, retry_after=1)
    if "deadline exceeded" in lowered or "shutting down" in lowered or "unavailable" in lowered:
        return OpenAIError(503, message, retry_after=1)
    if "internal error" in lowered or "failed to" in lowered or "cancelled" in lowered:
        return OpenAIError(500, message)
    return OpenAIError(400, message)


def bad(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param)


def check_keys(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(f"unsupported parameter {unknown[0]!r}", unknown[0])
    for key, values in ONLY.items():
        if key in body and body[key] is not None and body[key] not in values:
            raise bad(f"{key}={body[key]!r} is not supported (only {values[0]!r})", key)


def sampling_of(body: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
    sampling: dict[str, Any] = {**OPENAI_DEFAULTS, **({"max_tokens": max_tokens} if max_tokens is not None else {})}
    sampling.update({ours: body[theirs] for theirs, ours in PASSED.items() if body.get(theirs) is not None})
    return sampling


@dataclass
class Prompt:
    text: str
    """Echoed, and sent to the server (which tokenizes it unless ``ids`` are given)."""
    ids: list[int] | None = None


@dataclass
class Parsed:
    prompt: Prompt
    sampling: dict[str, Any]
    stream: bool
    include_usage: bool
    echo: bool = False
    logprobs: int | None = None
    """Alternatives per token (0: only each token's own), or None: no log probabilities."""


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    return bool(body.get("stream")), bool(options.get("include_usage"))


def completion_request(body: dict[str, Any], tokenizer: Any) -> Parsed:
    check_keys(body, COMPLETION_KEYS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        parsed_prompt = Prompt(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        parsed_prompt = Prompt(tokenizer.decode(prompt), list(prompt))
    else:
        raise bad("prompt must be a string, a list of token ids, or a list of exactly one of those", "prompt")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)):
        raise bad("logprobs must be an integer (alternatives per token)", "logprobs")
    echo = bool(body.get("echo"))
    if echo and logprobs is not None:
        raise bad("echo with logprobs is not supported (the prompt's log probabilities are not computed)", "echo")
    sampling = sampling_of(body, body.get("max_tokens"))
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    return Parsed(parsed_prompt, sampling, *_stream_flags(body), echo=echo, logprobs=logprobs)


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise bad("message content must be a string or a list of text parts", "messages")


def chat_request(body: dict[str, Any], tokenizer: Any) -> Parsed:
    check_keys(body, CHAT_KEYS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise bad("this model has no chat template; use /v1/completions", "messages")
    turns = [{"role": str(m["role"]), "content": _content(m)} for m in messages]
    try:
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as e:  # a template may raise on roles or orders it does not allow
        raise bad(f"the chat template refused these messages: {e}", "messages") from None
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling = sampling_of(body, CHAT_MAX_TOKENS if max_tokens is None else max_tokens)
    logprobs = None
    if body.get("logprobs"):
        top = body.get("top_logprobs") or 0
        if not isinstance(top, int) or isinstance(top, bool):
            raise bad("top_logprobs must be an integer", "top_logprobs")
        logprobs = sampling["logprobs"] = top
    elif body.get("top_logprobs"):
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    return Parsed(Prompt(tokenizer.decode(ids), ids), sampling, *_stream_flags(body), logprobs=logprobs)


def _top(entry: dict[str, dict[str, Any]], top: int) -> list[dict[str, Any]]:
    """The ``top`` most likely tokens at a position (the chosen one among them only if its rank allows)."""
    return sorted((alt for alt in entry.values() if alt["rank"] <= top), key=lambda alt: alt["rank"])[:top]


def completion_logprobs(tokens: list[dict[str, dict[str, Any]]], top: int, offset: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, and each position's most likely tokens by text."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry in tokens:
        chosen = next(iter(entry.values()))  # the server puts the chosen token first
        out["tokens"].append(chosen["decoded_token"])
        out["token_logprobs"].append(chosen["logprob"])
        out["top_logprobs"].append({alt["decoded_token"]: alt["logprob"] for alt in _top(entry, top)})
        out["text_offset"].append(offset)
        offset += len(chosen["decoded_token"])
    return out


def chat_logprobs(tokens: list[dict[str, dict[str, Any]]], top: int) -> dict[str, Any]:
    def item(alt: dict[str, Any]) -> dict[str, Any]:
        return {"token": alt["decoded_token"], "logprob": alt["logprob"], "bytes": list(alt["decoded_token"].encode())}

    return {"content": [{**item(next(iter(entry.values()))), "top_logprobs": [item(a) for a in _top(entry, top)]}
                        for entry in tokens]}
