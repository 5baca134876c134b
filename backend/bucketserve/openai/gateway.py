"""`bucketserve openai-gateway`: an OpenAI-compatible ``/v1/completions`` endpoint in front of
Triton, so tools written for vLLM's server (and our bench's ``openai://`` target) reach BucketServe.

Each HTTP request becomes one gRPC stream to Triton; streamed completions are Server-Sent Events
(``data: {chunk}`` ... ``data: [DONE]``). A client that disconnects has its Triton request
cancelled. Parameters OpenAI defines but the engine lacks (``n`` > 1, ``logprobs``, ``best_of``)
are refused with 400 rather than ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import uuid
from typing import Any, AsyncIterator

from aiohttp import web

from bucketserve_client.client import build_inputs, response_fields

# OpenAI / vLLM name -> our sampling_parameters key
PASSED = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
          "seed": "seed", "stop": "stop", "ignore_eos": "ignore_eos", "min_tokens": "min_tokens",
          "priority": "priority", "slo_ms": "slo_ms"}
REFUSED = {"n": 1, "best_of": 1, "logprobs": None, "suffix": None}
"""Parameters accepted only at these values."""
OPENAI_DEFAULTS = {"max_tokens": 16, "temperature": 1.0}
HTTP_STATUS = {"StatusCode.INVALID_ARGUMENT": 400, "StatusCode.UNAVAILABLE": 503, "StatusCode.NOT_FOUND": 404,
               "StatusCode.RESOURCE_EXHAUSTED": 429, "StatusCode.INTERNAL": 500}


def http_status(error: Any) -> int:
    """Errors on a gRPC stream carry no status code; one that comes before any response is the server
    refusing the request (the backend validates before it generates), hence 400."""
    return HTTP_STATUS.get(str(error.status()), 400)


class BadRequest(ValueError):
    pass


def _error(status: int, message: str) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def sampling_of(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The prompt and our sampling parameters from a completions body (OpenAI's defaults where absent)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string (or a list of exactly one string)")
    for key, allowed in REFUSED.items():
        if body.get(key, allowed) not in (allowed, None):
            raise BadRequest(f"{key}={body[key]!r} is not supported (only {allowed!r})")
    sampling = dict(OPENAI_DEFAULTS)
    sampling.update({ours: body[theirs] for theirs, ours in PASSED.items() if body.get(theirs) is not None})
    return prompt, sampling


class Gateway:
    def __init__(self, triton_url: str, models: list[str]):
        self.triton_url = triton_url
        self.models = models
        self.client: Any = None

    async def start(self, _app: web.Application) -> None:
        import tritonclient.grpc.aio as grpcaio

        self.client = grpcaio.InferenceServerClient(self.triton_url)
        if not self.models:
            index = await self.client.get_model_repository_index(as_json=True)
            self.models = [m["name"] for m in index.get("models", []) if m.get("state") == "READY"]

    async def stop(self, _app: web.Application) -> None:
        await self.client.close()

    async def list_models(self, _request: web.Request) -> web.Response:
        now = int(time.time())
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": now, "owned_by": "bucketserve"} for m in self.models]})

    async def _responses(self, model: str, prompt: str, sampling: dict[str, Any],
                         echo: bool) -> AsyncIterator[tuple[str, str | None, int | None, int | None]]:
        from tritonclient.utils import InferenceServerException

        async def requests() -> AsyncIterator[dict]:
            yield {"model_name": model, "inputs": build_inputs(prompt, True, sampling, echo),
                   "enable_empty_final_response": True}

        call = self.client.stream_infer(requests())
        failure = None
        finished = False
        try:
            # read to the end, errors included: the server closes the stream after the final answer
            async for result, error in call:
                if error is not None:
                    failure = failure or error
                    continue
                yield response_fields(result)
            finished = True
        finally:
            # closed early (the HTTP client left): cancel the gRPC call, and with it the Triton request. Only
            # then: cancelling a finished call races its final response in Triton 2.51 (see tests/stress.py)
            if not finished:
                call.cancel()
        if failure is not None:
            raise failure if isinstance(failure, InferenceServerException) else InferenceServerException(str(failure))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        from tritonclient.utils import InferenceServerException

        try:
            body = await request.json()
        except json.JSONDecodeError as e:
            return _error(400, f"body is not JSON: {e}")
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object")
        model = body.get("model") or (self.models[0] if self.models else "")
        if model not in self.models:
            return _error(404, f"model {model!r} does not exist; models: {self.models}")
        try:
            prompt, sampling = sampling_of(body)
        except BadRequest as e:
            return _error(400, str(e))
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model}
        # closed as soon as the handler ends, also when it is cancelled because the client left
        async with contextlib.aclosing(self._responses(model, prompt, sampling, bool(body.get("echo")))) as responses:
            if body.get("stream"):
                usage_wanted = bool((body.get("stream_options") or {}).get("include_usage"))
                return await self._stream(request, responses, meta, usage_wanted)
            parts = []
            try:
                async for part in responses:
                    parts.append(part)
            except InferenceServerException as e:
                return _error(500 if parts else http_status(e), e.message())
        text = "".join(p[0] for p in parts)
        reason = next((p[1] for p in reversed(parts) if p[1]), None)
        usage = self._usage(parts)
        return web.json_response({**meta, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                       "finish_reason": reason}], "usage": usage})

    @staticmethod
    def _usage(parts: list[tuple[str, str | None, int | None, int | None]]) -> dict[str, int]:
        prompt_tokens = next((p[2] for p in parts if p[2] is not None), 0)
        completion_tokens = sum(p[3] or 0 for p in parts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def _stream(self, request: web.Request, responses: AsyncIterator, meta: dict[str, Any],
                      usage_wanted: bool) -> web.StreamResponse:
        from tritonclient.utils import InferenceServerException

        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        parts = []
        first = True
        try:
            async for part in responses:
                if first:  # an error before the first response still gets its HTTP status
                    await out.prepare(request)
                    first = False
                parts.append(part)
                text, reason = part[0], part[1]
                if text or reason:
                    await self._event(out, {**meta, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                                 "finish_reason": reason}]})
        except InferenceServerException as e:
            if first:
                return _error(http_status(e), e.message())
            await self._event(out, {"error": {"message": e.message(), "type": "server_error", "code": 500}})
        if usage_wanted and parts:
            await self._event(out, {**meta, "choices": [], "usage": self._usage(parts)})
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    @staticmethod
    async def _event(out: web.StreamResponse, chunk: dict[str, Any]) -> None:
        await out.write(f"data: {json.dumps(chunk)}\n\n".encode())


def app(triton_url: str, models: list[str]) -> web.Application:
    gateway = Gateway(triton_url, models)
    application = web.Application()
    application.on_startup.append(gateway.start)
    application.on_cleanup.append(gateway.stop)
    application.router.add_get("/v1/models", gateway.list_models)
    application.router.add_post("/v1/completions", gateway.completions)
    return application


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="localhost:8001", help="Triton gRPC address HOST:PORT")
    p.add_argument("--models", default="", help="comma-separated models to expose (default: every READY model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to expose it)")
    p.add_argument("--port", type=int, default=9000)


def main(args: argparse.Namespace) -> int:
    models = [m for m in args.models.split(",") if m]
    print(f"[openai-gateway] http://{args.host}:{args.port}/v1 -> Triton gRPC {args.url}", flush=True)
    web.run_app(app(args.url, models), host=args.host, port=args.port, handler_cancellation=True, print=None)
    return 0
