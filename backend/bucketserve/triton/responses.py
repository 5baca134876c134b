"""The response thread: turns the engine's outputs into Triton responses, and polls cancellation.

Everything that talks to Triton's response senders happens here, off the engine's threads. This
thread alone decides when a request is finished for its client, so each request gets exactly one
final response: later outputs for it are dropped.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import triton_python_backend_utils as pb_utils

from bucketserve.engine.engine import Engine, lower_priority
from bucketserve.engine.executor import TokenLogprobs
from bucketserve.engine.outputs import RequestOutput, coalesce
from bucketserve.engine.request import FinishReason, Request
from bucketserve.triton.inputs import OutputOptions
from bucketserve.triton.pacing import StreamPacer

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
POLL_SHARE = 0.02
"""The most of the time polling for cancellations may take: each ``is_cancelled`` is an IPC call to Triton (measured
~0.1 ms), so with 64 streams a poll every 50 ms kept this thread busy enough to slow the engine's threads by ~15%;
with many streams the polls are spaced further apart than ``cancel_poll_ms``."""


def error_response(message: str, code: Any) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


@dataclass
class ClientStream:
    request: Request
    options: OutputOptions
    sender: Any
    pending_text: str = ""  # not yet sent: everything so far (non-streaming), or since the last response
    pending_tokens: int = 0
    pending_logprobs: list[tuple[int, TokenLogprobs]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    """Of the tokens already given to this stream (the engine may be ahead of it)."""
    last_sent: float | None = None
    done: bool = False

    def logprobs_json(self, decode: Callable[[int], str]) -> str:
        """vllm_backend's shape: per token, the chosen token and its alternatives by id."""
        tokens = []
        for token, lp in self.pending_logprobs:
            entry = {str(token): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": decode(token)}}
            for rank, (alternative, logprob) in enumerate(lp.top, start=1):
                entry.setdefault(str(alternative), {"logprob": logprob, "rank": rank, "decoded_token": decode(alternative)})
            tokens.append(entry)
        return json.dumps(tokens)

    def response(self, text: str, finish: FinishReason | None, decode: Callable[[int], str]) -> Any:
        opts = self.options
        tensors = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
        if opts.return_finish_reason and finish is not None:
            tensors.append(pb_utils.Tensor("finish_reason", np.array([finish.value.encode()], dtype=np.object_)))
        if opts.return_num_input_tokens:
            tensors.append(pb_utils.Tensor("num_input_tokens", np.array([self.request.prompt_len], dtype=np.uint32)))
        if opts.return_num_output_tokens:
            tensors.append(pb_utils.Tensor("num_output_tokens", np.array([self.pending_tokens], dtype=np.uint32)))
        if opts.return_logprobs:
            tensors.append(pb_utils.Tensor("logprobs", np.array([self.logprobs_json(decode).encode()], dtype=np.object_)))
        if opts.return_cumulative_logprob:
            tensors.append(pb_utils.Tensor("cumulative_logprob",
                                           np.array([self.cumulative_logprob], dtype=np.float32)))
        self.pending_tokens = 0
        self.pending_logprobs = []
        return pb_utils.InferenceResponse(output_tensors=tensors)


class ResponseThread:
    def __init__(self, engine: Engine, poll_s: float, log: Callable[[str], None],
                 on_tick: Callable[[], None] = lambda: None, stream_interval_s: float = 0.0, tick_s: float = 0.5,
                 stream_share: float = 1.0):
        self.engine = engine
        self.poll_s = poll_s
        self.tick_s = tick_s
        """How often ``on_tick`` (the metrics update) runs."""
        self.pacer = StreamPacer(stream_interval_s, stream_share)
        """A stream's text waits to share a response with what comes next (its first text and its end go at once):
        fewer, larger responses, the same text in total."""
        self.log = log
        self.on_tick = on_tick
        self._queue: queue.Queue = queue.Queue()
        self._streams: dict[int, ClientStream] = {}
        tokenizer = engine.tokenizer.tokenizer
        self._decode: Callable[[int], str] = lambda token: tokenizer.decode([token])
        self._thread = threading.Thread(target=self._loop, name="bucketserve-responses", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._queue.put(("stop", None))
        self._thread.join(timeout)

    def register(self, stream: ClientStream) -> None:
        """Call before the engine sees the request, so its stream exists before its first output."""
        self._queue.put(("register", stream))

    def put(self, outputs: list[RequestOutput]) -> None:
        """The engine's output callback."""
        self._queue.put(("outputs", outputs))

    def _loop(self) -> None:
        lower_priority()
        next_poll = next_tick = time.monotonic()
        while True:
            # with no stream open there is nothing to poll: wake for the metrics tick only (an idle model's
            # thread woke 20 times a second, and every wake-up takes a core from a busy neighbour's matmuls)
            wait = self.poll_s if self._streams else max(0.0, next_tick - time.monotonic())
            try:
                items = [self._queue.get(timeout=wait)]
            except queue.Empty:
                items = []
            while True:  # everything queued meanwhile: a stream that lagged gets one response for all of it
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            outputs: list[RequestOutput] = []
            for kind, item in items:
                if kind == "register":
                    self._streams[item.request.id] = item
                    if item.options.stream:
                        self.pacer.opened()
                elif kind == "outputs":
                    outputs += item
            for output in coalesce(outputs):
                self._handle(output)
            if any(kind == "stop" for kind, _ in items):
                break
            now = time.monotonic()
            if now >= next_poll:
                self._poll_cancelled()
                done = time.monotonic()
                next_poll = done + max(self.poll_s, (done - now) / POLL_SHARE)
            if now >= next_tick:
                self._safely(self.on_tick)
                next_tick = time.monotonic() + self.tick_s

    def _safely(self, fn: Callable, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:  # a failed send must not stop responses to everyone else
            self.log(f"response thread: {type(e).__name__}: {e}")

    def _handle(self, output: RequestOutput) -> None:
        """Answer one output; if that fails, end its request with one INTERNAL error."""
        try:
            self._on_output(output)
        except Exception as e:
            self.log(f"response thread: request {output.request.id}: {type(e).__name__}: {e}")
            stream = self._streams.get(output.request.id)
            if stream is not None and not stream.done:
                self.engine.abort(stream.request.id)
                self._safely(self._send, stream, error_response(f"failed to build the response: {e}",
                                                                pb_utils.TritonError.INTERNAL), True)

    def _send(self, stream: ClientStream, response: Any, final: bool) -> None:
        if final:
            stream.done = True
            self._streams.pop(stream.request.id, None)
            if stream.options.stream:
                self.pacer.closed()
        stream.sender.send(response, flags=FINAL if final else 0)

    def _on_output(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request.id)
        if stream is None or stream.done:
            return
        finish = output.finish_reason
        if output.ends_without_text:
            if stream.options.stream and stream.pending_text:  # what came before the failure still arrives
                self._send(stream, stream.response(stream.pending_text, None, self._decode), final=False)
            if output.error is not None:
                code = pb_utils.TritonError.UNAVAILABLE if finish is FinishReason.DEADLINE else pb_utils.TritonError.INTERNAL
                self._send(stream, error_response(output.error, code), final=True)
            else:
                self._send(stream, error_response("request was cancelled", pb_utils.TritonError.CANCELLED), final=True)
            return
        stream.pending_tokens += len(output.token_ids)
        stream.pending_logprobs += zip(output.token_ids, output.logprobs)
        stream.cumulative_logprob += sum(lp.logprob for lp in output.logprobs)
        stream.pending_text += output.text
        if stream.options.stream:
            now = time.monotonic()
            if finish is not None or (stream.pending_text and self.pacer.due(stream.last_sent, now)):
                self._send(stream, stream.response(stream.pending_text, finish, self._decode), final=finish is not None)
                stream.pending_text, stream.last_sent = "", now
                self.pacer.sent(time.monotonic() - now)
            return
        if finish is not None:
            text = stream.pending_text if stream.options.exclude_input_in_output else stream.request.prompt + stream.pending_text
            self._send(stream, stream.response(text, finish, self._decode), final=True)

    def _poll_cancelled(self) -> None:
        for stream in list(self._streams.values()):
            self._safely(self._cancel_if_asked, stream)

    def _cancel_if_asked(self, stream: ClientStream) -> None:
        if stream.sender.is_cancelled():
            self.engine.abort(stream.request.id)
            self._send(stream, error_response("request was cancelled", pb_utils.TritonError.CANCELLED), final=True)
