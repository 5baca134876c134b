"""Generate text over Triton's gRPC streaming API: sync iterator, one-shot call, and asyncio.

A decoupled model answers only on a gRPC stream, so even the one-shot call uses one (with
``stream=false`` the model sends exactly one response).
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException


class BucketServeError(RuntimeError):
    """The server answered a request with an error (``status`` is Triton's, e.g. StatusCode.INVALID_ARGUMENT)."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    num_input_tokens: int | None
    num_output_tokens: int | None


def build_inputs(prompt: str, stream: bool, sampling: dict[str, Any], echo: bool = False,
                 prompt_ids: list[int] | None = None, logprobs: bool = False) -> list[grpcclient.InferInput]:
    """Tensors for one request; ``echo`` prepends the prompt to a non-streamed completion; ``prompt_ids`` gives
    the prompt as token ids (``prompt`` is then only echoed); ``logprobs`` asks for the ``logprobs`` output."""
    def tensor(name: str, value: np.ndarray, dtype: str) -> grpcclient.InferInput:
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        return t

    inputs = [
        tensor("text_input", np.array([prompt.encode("utf-8")], dtype=np.object_), "BYTES"),
        tensor("stream", np.array([stream]), "BOOL"),
        tensor("exclude_input_in_output", np.array([not echo]), "BOOL"),
    ]
    if prompt_ids is not None:
        inputs.append(tensor("prompt_token_ids", np.array(prompt_ids, dtype=np.int64), "INT64"))
    if sampling:
        inputs.append(tensor("sampling_parameters", np.array([json.dumps(sampling).encode()], dtype=np.object_), "BYTES"))
    for name in ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens"):
        inputs.append(tensor(name, np.array([True]), "BOOL"))
    if logprobs:
        inputs.append(tensor("return_logprobs", np.array([True]), "BOOL"))
    return inputs


def is_final(result: Any) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


def response_fields(result: Any) -> tuple[str, str | None, int | None, int | None]:
    """(text, finish_reason, num_input_tokens, num_output_tokens) of one response; None where absent."""
    text = result.as_numpy("text_output")
    reason = result.as_numpy("finish_reason")
    n_in = result.as_numpy("num_input_tokens")
    n_out = result.as_numpy("num_output_tokens")
    return (
        b"".join(text.reshape(-1)).decode("utf-8") if text is not None else "",
        reason.reshape(-1)[0].decode() if reason is not None else None,
        int(n_in.reshape(-1)[0]) if n_in is not None else None,
        int(n_out.sum()) if n_out is not None else None,
    )


def response_logprobs(result: Any) -> list[dict[str, dict[str, Any]]]:
    """Per token of one response: {token id: {logprob, rank, decoded_token}}, the chosen token first."""
    raw = result.as_numpy("logprobs")
    return [] if raw is None else json.loads(raw.reshape(-1)[0])


def completion(responses: list[tuple[str, str | None, int | None, int | None]]) -> Completion:
    """Fold the responses of one request (one, unless a server splits them) into a Completion."""
    text = "".join(r[0] for r in responses)
    reason = next((r[1] for r in reversed(responses) if r[1] is not None), None)
    n_in = next((r[2] for r in responses if r[2] is not None), None)
    n_out = sum(r[3] or 0 for r in responses)
    return Completion(text, reason, n_in, n_out)


def _error(error: InferenceServerException) -> BucketServeError:
    return BucketServeError(error.message(), error.status())


class BucketServeClient:
    """Synchronous client; each call opens its own gRPC stream, so calls may run in parallel threads."""

    def __init__(self, url: str = "localhost:8001", model: str = "bucketserve"):
        self.url = url
        self.model = model
        self._local = threading.local()

    def _client(self) -> grpcclient.InferenceServerClient:
        """One channel per thread: a tritonclient client serves one stream at a time, and a new
        channel per call costs more than a small request's whole round trip."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = grpcclient.InferenceServerClient(self.url)
        return client

    def _responses(self, prompt: str, stream: bool, sampling: dict[str, Any], echo: bool = False) -> Iterator[Any]:
        results: queue.Queue = queue.Queue()
        client = self._client()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        finished = False
        try:
            client.async_stream_infer(self.model, build_inputs(prompt, stream, sampling, echo),
                                      enable_empty_final_response=True)
            while not finished:
                result, error = results.get()
                if error is not None:
                    finished = True  # an error ends the request: cancelling it now would race Triton
                    raise _error(error)
                finished = is_final(result)
                yield result
        finally:
            # a caller that stops iterating early cancels its request on the server
            client.stop_stream(cancel_requests=not finished)

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Yield text deltas as the server generates them."""
        for result in self._responses(prompt, True, sampling):
            text, *_ = response_fields(result)
            if text:
                yield text

    def generate(self, prompt: str, echo: bool = False, **sampling: Any) -> Completion:
        """One request, one response: the whole completion (after the prompt, if ``echo``)."""
        return completion([response_fields(r) for r in self._responses(prompt, False, sampling, echo)])


class AsyncBucketServeClient:
    """asyncio client over tritonclient.grpc.aio."""

    def __init__(self, url: str = "localhost:8001", model: str = "bucketserve"):
        self.url = url
        self.model = model

    async def _responses(self, prompt: str, stream: bool, sampling: dict[str, Any],
                         echo: bool = False) -> AsyncIterator[Any]:
        client = grpcaio.InferenceServerClient(self.url)

        async def requests() -> AsyncIterator[dict]:
            yield {"model_name": self.model, "inputs": build_inputs(prompt, stream, sampling, echo),
                   "enable_empty_final_response": True}

        try:
            # read to the end: the server closes the stream after the final response, and a stream
            # abandoned half-way keeps the model from unloading until Triton's exit timeout
            async for result, error in client.stream_infer(requests()):
                if error is not None:
                    raise _error(error)
                yield result
        finally:
            await client.close()

    async def stream(self, prompt: str, **sampling: Any) -> AsyncIterator[str]:
        async for result in self._responses(prompt, True, sampling):
            text, *_ = response_fields(result)
            if text:
                yield text

    async def generate(self, prompt: str, echo: bool = False, **sampling: Any) -> Completion:
        return completion([response_fields(r) async for r in self._responses(prompt, False, sampling, echo)])
