"""`bucketserve openai-gateway` (or `bucketserve serve --openai-port`): OpenAI's API in front of Triton, so
clients written for OpenAI or vLLM (the ``openai`` SDK, LangChain, our bench's ``openai://`` target) reach
BucketServe: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and ``/health``.

Each HTTP request becomes one gRPC stream to Triton; streamed answers are Server-Sent Events
(``data: {chunk}`` ... ``data: [DONE]``). A client that disconnects has its Triton request cancelled.
Chat messages go through the model's chat template here, with the model's own tokenizer, and reach
the server as token ids. Errors come in OpenAI's shape with the status its SDKs act on (see protocol.py).
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import os
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from aiohttp import web

from bucketserve.openai.protocol import (OpenAIError, Parsed, chat_logprobs, chat_request, completion_logprobs,
                                         completion_request, from_triton)
from bucketserve_client.client import Completion, build_inputs, completion, response_fields, response_logprobs

API_KEY_ENV = "BUCKETSERVE_API_KEY"


class Part:
    """One Triton response: text, finish reason, token counts and log probabilities."""

    def __init__(self, result: Any, logprobs: bool):
        self.fields = response_fields(result)
        self.text, self.finish_reason = self.fields[:2]
        self.logprobs = response_logprobs(result) if logprobs else []


def usage(done: Completion) -> dict[str, int]:
    prompt_tokens, completion_tokens = done.num_input_tokens or 0, done.num_output_tokens or 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Gateway:
    def __init__(self, triton_url: str, models: list[str], tokenizer_path: str, api_key: str | None = None):
        self.triton_url = triton_url
        self.models = models
        self.tokenizer_path = tokenizer_path
        self.api_key = api_key
        self.client: Any = None
        self.tokenizer: Any = None

    async def start(self, _app: web.Application) -> None:
        import tritonclient.grpc.aio as grpcaio
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        self.client = grpcaio.InferenceServerClient(self.triton_url)
        if not self.models:
            index = await self.client.get_model_repository_index(as_json=True)
            self.models = [m["name"] for m in index.get("models", []) if m.get("state") == "READY"]

    async def stop(self, _app: web.Application) -> None:
        await self.client.close()

    @web.middleware
    async def errors_and_auth(self, request: web.Request,
                              handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if self.api_key and request.path != "/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return OpenAIError(401, "invalid or missing API key (Authorization: Bearer ...)").response()
        try:
            return await handler(request)
        except OpenAIError as e:
            return e.response()
        except web.HTTPException:
            raise
        except Exception as e:  # noqa: BLE001 - a bug here answers this request with a 500, nothing more
            return OpenAIError(500, f"internal error in the gateway: {type(e).__name__}: {e}").response()

    async def health(self, _request: web.Request) -> web.Response:
        try:
            ready = await self.client.is_server_ready()
        except Exception:  # noqa: BLE001 - not reachable is not ready
            ready = False
        return web.json_response({"status": "ok" if ready else "unavailable"}, status=200 if ready else 503)

    async def list_models(self, _request: web.Request) -> web.Response:
        now = int(time.time())
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": now, "owned_by": "bucketserve"} for m in self.models]})

    async def _body(self, request: web.Request) -> tuple[dict[str, Any], str]:
        try:
            body = await request.json()
        except json.JSONDecodeError as e:
            raise OpenAIError(400, f"body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "body must be a JSON object")
        model = body.get("model") or (self.models[0] if self.models else "")
        if model not in self.models:
            raise OpenAIError(404, f"model {model!r} does not exist; models: {self.models}", "model")
        return body, model

    async def _parts(self, model: str, parsed: Parsed) -> AsyncIterator[Part]:
        from tritonclient.utils import InferenceServerException

        async def requests() -> AsyncIterator[dict]:
            inputs = build_inputs(parsed.prompt.text, True, parsed.sampling, prompt_ids=parsed.prompt.ids,
                                  logprobs=parsed.logprobs is not None)
            yield {"model_name": model, "inputs": inputs, "enable_empty_final_response": True}

        call = self.client.stream_infer(requests())
        failure = None
        finished = False
        try:
            # read to the end, errors included: the server closes the stream after the final answer
            async for result, error in call:
                if error is not None:
                    failure = failure or error
                    continue
                yield Part(result, parsed.logprobs is not None)
            finished = True
        finally:
            # closed early (the HTTP client left): cancel the gRPC call, and with it the Triton request. Only
            # then: cancelling a finished call races its final response in Triton 2.51 (see tests/stress.py)
            if not finished:
                call.cancel()
        if failure is not None:
            message = failure.message() if isinstance(failure, InferenceServerException) else str(failure)
            raise from_triton(message)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._body(request)
        parsed = completion_request(body, self.tokenizer)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model}
        offset = [len(parsed.prompt.text) if parsed.echo else 0]

        def choice(text: str, reason: str | None, parts: list[Part]) -> dict[str, Any]:
            logprobs = None
            if parsed.logprobs is not None:
                logprobs = completion_logprobs([t for p in parts for t in p.logprobs], parsed.logprobs, offset[0])
                offset[0] += len(text)
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}

        echo = parsed.prompt.text if parsed.echo else ""
        return await self._answer(request, model, parsed, meta, choice, echo)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._body(request)
        parsed = chat_request(body, self.tokenizer)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model}
        first = [True]

        def choice(text: str, reason: str | None, parts: list[Part]) -> dict[str, Any]:
            logprobs = None
            if parsed.logprobs is not None:
                logprobs = chat_logprobs([t for p in parts for t in p.logprobs], parsed.logprobs)
            if parsed.stream:
                delta: dict[str, Any] = {"content": text} if text else {}
                if first[0]:
                    delta = {"role": "assistant", **delta, "content": text}
                    first[0] = False
                return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": reason}

        return await self._answer(request, model, parsed, meta, choice, "")

    async def _answer(self, request: web.Request, model: str, parsed: Parsed, meta: dict[str, Any],
                      choice: Callable[[str, str | None, list[Part]], dict[str, Any]], echo: str) -> web.StreamResponse:
        # closed as soon as the handler ends, also when it is cancelled because the client left
        async with contextlib.aclosing(self._parts(model, parsed)) as parts:
            if parsed.stream:
                return await self._stream(request, parts, meta, choice, parsed.include_usage, echo)
            got = [part async for part in parts]
        done = completion([p.fields for p in got])
        return web.json_response({**meta, "choices": [choice(echo + done.text, done.finish_reason, got)],
                                  "usage": usage(done)})

    async def _stream(self, request: web.Request, parts: AsyncIterator[Part], meta: dict[str, Any],
                      choice: Callable[[str, str | None, list[Part]], dict[str, Any]], include_usage: bool,
                      echo: str) -> web.StreamResponse:
        meta = {**meta, "object": meta["object"] + ".chunk" if meta["object"] == "chat.completion" else meta["object"]}
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        seen: list[Part] = []
        try:
            async for part in parts:
                if not seen:  # an error before the first response still gets its own HTTP status
                    await out.prepare(request)
                seen.append(part)
                text = (echo if len(seen) == 1 else "") + part.text
                if text or part.finish_reason or len(seen) == 1:
                    await self._event(out, {**meta, "choices": [choice(text, part.finish_reason, [part])]})
        except OpenAIError as e:
            if not seen:
                return e.response()
            await self._event(out, e.body())
        if include_usage and seen:
            await self._event(out, {**meta, "choices": [], "usage": usage(completion([p.fields for p in seen]))})
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    @staticmethod
    async def _event(out: web.StreamResponse, chunk: dict[str, Any]) -> None:
        await out.write(f"data: {json.dumps(chunk)}\n\n".encode())


def app(triton_url: str, models: list[str], tokenizer_path: str, api_key: str | None = None) -> web.Application:
    gateway = Gateway(triton_url, models, tokenizer_path, api_key)
    application = web.Application(middlewares=[gateway.errors_and_auth])
    application.on_startup.append(gateway.start)
    application.on_cleanup.append(gateway.stop)
    application.router.add_get("/health", gateway.health)
    application.router.add_get("/v1/models", gateway.list_models)
    application.router.add_post("/v1/completions", gateway.completions)
    application.router.add_post("/v1/chat/completions", gateway.chat)
    return application


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="localhost:8001", help="Triton gRPC address HOST:PORT")
    p.add_argument("--models", default="", help="comma-separated models to expose (default: every READY model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to expose it)")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--tokenizer", default=None,
                   help="the served model's checkpoint directory, for chat templates and token-id prompts "
                        "(default: the default model)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}; none: open)")


def main(args: argparse.Namespace) -> int:
    from bucketserve_client.defaults import default_model_dir

    models = [m for m in args.models.split(",") if m]
    tokenizer = args.tokenizer or str(default_model_dir())
    print(f"[openai-gateway] http://{args.host}:{args.port}/v1 -> Triton gRPC {args.url} (tokenizer {tokenizer})",
          flush=True)
    web.run_app(app(args.url, models, tokenizer, args.api_key), host=args.host, port=args.port,
                handler_cancellation=True, print=None)
    return 0
