"""Where a benchmark sends its requests: a Triton model over gRPC streaming, or an OpenAI-compatible
completions endpoint over HTTP streaming (vLLM's server, or our gateway).

Both send the same greedy request (``max_tokens`` = the spec's output length, EOS ignored, so every
target generates exactly that many tokens) and time the first token and the final response.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol

from bucketserve_client.workload import RequestSpec

TRITON_METRICS_PORT = 8002


@dataclass(frozen=True)
class Reply:
    ttft: float | None
    e2e: float
    output_tokens: int
    error: str | None = None


class Target(Protocol):
    label: str
    metrics_url: str | None
    """Prometheus text endpoint with this target's ``bucketserve_*`` series, if it has one."""
    model: str

    async def send(self, spec: RequestSpec) -> Reply: ...

    async def describe(self) -> dict[str, Any]:
        """What the server says it runs (model, executor, engine parameters), for the report."""

    async def close(self) -> None: ...


class _Clock:
    """First-token and end times of one request, relative to its send."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.tokens = 0

    def tokens_arrived(self, n: int) -> None:
        if n > 0 and self.first is None:
            self.first = time.perf_counter() - self.start
        self.tokens += n

    def reply(self, error: str | None = None) -> Reply:
        return Reply(self.first, time.perf_counter() - self.start, self.tokens, error)


class TritonTarget:
    """``triton://HOST:PORT/MODEL[?metrics=PORT]``: gRPC streaming, as genai-perf and our client do."""

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        self.model = parts.path.strip("/")
        if not parts.hostname or not parts.port or not self.model:
            raise ValueError(f"a Triton target is triton://HOST:PORT/MODEL, got {url!r}")
        self.address = f"{parts.hostname}:{parts.port}"
        query = urllib.parse.parse_qs(parts.query)
        metrics_port = int(query.get("metrics", [TRITON_METRICS_PORT])[0])
        self.metrics_url = f"http://{parts.hostname}:{metrics_port}/metrics"
        self.label = self.model
        self._client: Any = None

    async def send(self, spec: RequestSpec) -> Reply:
        import tritonclient.grpc.aio as grpcaio
        from tritonclient.utils import InferenceServerException

        from bucketserve_client.client import build_inputs, response_fields

        if self._client is None:  # created inside the running event loop, which the channel binds to
            self._client = grpcaio.InferenceServerClient(self.address)
        sampling = {"max_tokens": spec.output_len, "temperature": 0, "ignore_eos": True, "priority": spec.cls.priority}
        if spec.slo_ms is not None:
            sampling["slo_ms"] = spec.slo_ms
        request = {"model_name": self.model, "inputs": build_inputs(spec.prompt or "", True, sampling),
                   "enable_empty_final_response": True}

        async def requests() -> AsyncIterator[dict]:
            yield request

        clock = _Clock()
        error = None
        try:
            # read to the end: the server closes the stream after the final response
            async for result, err in self._client.stream_infer(requests()):
                if err is not None:
                    error = error or err.message()
                    continue
                clock.tokens_arrived(response_fields(result)[3] or 0)
        except InferenceServerException as e:
            error = e.message()
        return clock.reply(error)

    async def describe(self) -> dict[str, Any]:
        import aiohttp
        import tritonclient.grpc.aio as grpcaio

        from bucketserve_client import scrape

        client = grpcaio.InferenceServerClient(self.address)
        try:
            config = (await client.get_model_config(self.model, as_json=True))["config"]
        finally:
            await client.close()
        described: dict[str, Any] = {k: v.get("string_value", v.get("stringValue")) for k, v in config.get("parameters", {}).items()}
        async with aiohttp.ClientSession() as session, session.get(self.metrics_url) as r:
            found = scrape.series(await r.text(), self.model)
        for labels, value in found.get("bucketserve_model_info", []):
            described.update({k: v for k, v in labels.items() if k != "model"}, parameters=int(value))
        return described

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


class OpenAITarget:
    """``openai://HOST:PORT/v1[?model=NAME]``: ``POST /v1/completions`` with ``"stream": true``.

    Without ``model`` the first model ``GET /v1/models`` lists is used. Tokens are counted from the
    final usage chunk (``stream_options.include_usage``), else one per non-empty text chunk.
    """

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        if not parts.hostname or not parts.port:
            raise ValueError(f"an OpenAI target is openai://HOST:PORT/v1, got {url!r}")
        self.base = f"http://{parts.hostname}:{parts.port}{parts.path.rstrip('/') or '/v1'}"
        self.model = urllib.parse.parse_qs(parts.query).get("model", [""])[0]
        self.label = f"openai:{parts.hostname}:{parts.port}"
        self.metrics_url = None
        self._session: Any = None

    async def _open(self) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                                  connector=aiohttp.TCPConnector(limit=0))
            if not self.model:
                async with self._session.get(f"{self.base}/models") as r:
                    r.raise_for_status()
                    self.model = (await r.json())["data"][0]["id"]
            self.label = f"{self.model}@{self.label.removeprefix('openai:')}"
        return self._session

    async def send(self, spec: RequestSpec) -> Reply:
        import aiohttp

        session = await self._open()
        body = {"model": self.model, "prompt": spec.prompt or "", "max_tokens": spec.output_len, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        clock = _Clock()
        usage = None
        try:
            async with session.post(f"{self.base}/completions", json=body) as r:
                if r.status != 200:
                    return clock.reply(f"HTTP {r.status}: {(await r.text())[:500]}")
                async for line in r.content:
                    data = line.decode("utf-8", "replace").strip()
                    if not data.startswith("data:") or data == "data: [DONE]":
                        continue
                    chunk = json.loads(data[5:])
                    if "error" in chunk:
                        return clock.reply(str(chunk["error"].get("message", chunk["error"])))
                    usage = chunk.get("usage") or usage
                    if any(c.get("text") for c in chunk.get("choices", [])):
                        clock.tokens_arrived(1)
        except aiohttp.ClientError as e:
            return clock.reply(f"{type(e).__name__}: {e}")
        if usage and usage.get("completion_tokens") is not None:
            clock.tokens = int(usage["completion_tokens"])
        return clock.reply()

    async def describe(self) -> dict[str, Any]:
        session = await self._open()
        async with session.get(f"{self.base}/models") as r:
            listed = [m for m in (await r.json())["data"] if m["id"] == self.model]
        return {k: v for k, v in (listed[0] if listed else {}).items() if isinstance(v, (str, int, float))}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def parse_target(text: str) -> Target:
    scheme = text.split("://", 1)[0]
    if scheme == "triton":
        return TritonTarget(text)
    if scheme == "openai":
        return OpenAITarget(text)
    raise ValueError(f"a target is triton://HOST:PORT/MODEL or openai://HOST:PORT/v1, got {text!r}")
