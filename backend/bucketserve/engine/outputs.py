"""From the engine's token events to what a client sees: one ``RequestOutput`` per request per batch of
events, with its text delta, token ids, and exactly one final output (finish reason or error).

Runs on the engine's output thread, never the engine thread. Detokenizing and stop strings happen
here for every front end. Events that piled up while a client lagged are coalesced into one output
per request, so a slow consumer gets fewer, larger deltas and the same text in total; a front end that
lags behind its outputs can ``coalesce`` them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from bucketserve.engine.detokenizer import TextStream
from bucketserve.engine.executor import TokenLogprobs
from bucketserve.engine.request import FinishReason, Request


@dataclass
class Event:
    """What the engine thread reports for one request in one step."""

    request: Request
    new_tokens: list[int]
    finish: FinishReason | None = None
    error: str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    """One per new token, when the request asked for log probabilities."""


@dataclass
class RequestOutput:
    request: Request
    text: str = ""
    """Text released since this request's previous output."""
    token_ids: list[int] = field(default_factory=list)
    """Tokens generated since this request's previous output (those a stop string cut off included)."""
    finish_reason: FinishReason | None = None
    """Set on the request's one final output."""
    error: str | None = None
    """Why the request failed (``finish_reason`` ERROR or DEADLINE), for the client."""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    """One per entry of ``token_ids`` when the request asked for log probabilities (``sampling.logprobs``)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ends_without_text(self) -> bool:
        return ends_without_text(self.error, self.finish_reason)


def ends_without_text(error: str | None, finish: FinishReason | None) -> bool:
    """A failure or a cancellation: a final of its own, never joined to the text before it."""
    return error is not None or finish is FinishReason.CANCELLED


Abort = Callable[[int, FinishReason], None]


def coalesce(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """One output per request for its consecutive outputs (text and tokens joined; the last one's finish and
    error kept), except that an error or cancellation stays separate from the text before it."""
    merged: list[RequestOutput] = []
    latest: dict[int, RequestOutput] = {}
    for output in outputs:
        prev = latest.get(output.request.id)
        if prev is None or prev.finished or output.ends_without_text:
            latest[output.request.id] = RequestOutput(output.request, output.text, list(output.token_ids),
                                                      output.finish_reason, output.error, list(output.logprobs))
            merged.append(latest[output.request.id])
            continue
        prev.text += output.text
        prev.token_ids += output.token_ids
        prev.logprobs += output.logprobs
        prev.finish_reason, prev.error = output.finish_reason, output.error
    return merged


class OutputProcessor:
    def __init__(self, tokenizer: Any, abort: Abort):
        self.tokenizer = tokenizer
        self.abort = abort
        self._texts: dict[int, TextStream] = {}
        self._stopped: set[int] = set()
        """Requests a stop string finished, until the engine's own final event for them arrives."""

    def process(self, events: list[Event]) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        latest: dict[int, RequestOutput] = {}
        for event in events:
            rid = event.request.id
            if rid in self._stopped:
                if event.finish is not None:
                    self._stopped.discard(rid)
                continue
            out = latest.get(rid)
            if out is not None and out.finished:
                continue
            final_only = ends_without_text(event.error, event.finish)
            if out is None or (final_only and (out.text or out.token_ids)):
                # an error or cancellation is an output of its own: the text before it still reaches the client
                out = latest[rid] = RequestOutput(event.request)
                outputs.append(out)
            self._apply(event, out, final_only)
        return outputs

    def _apply(self, event: Event, out: RequestOutput, final_only: bool) -> None:
        rid = event.request.id
        if final_only:
            self._texts.pop(rid, None)
            out.finish_reason, out.error = event.finish, event.error
            return
        text = self._texts.get(rid)
        if text is None:
            text = self._texts[rid] = TextStream(self.tokenizer, event.request.sampling.stop)
        out.text += text.push(event.new_tokens)
        out.token_ids += event.new_tokens
        out.logprobs += event.logprobs
        finish = event.finish
        if text.stopped:
            finish = FinishReason.STOP
            if event.finish is None:  # the engine still runs it: stop it, and drop what it sends until then
                self._stopped.add(rid)
                self.abort(rid, FinishReason.STOP)
        if finish is not None:
            out.text += text.finish()
            out.finish_reason = finish
            del self._texts[rid]
