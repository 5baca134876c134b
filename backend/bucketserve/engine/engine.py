"""The engine: a request's whole life, from prompt text to its one final output.

``make_request`` tokenizes and checks a prompt on the caller's thread (a bad one raises
``InvalidInput`` at once); ``submit`` queues it. One engine thread owns the ``EngineCore`` (executor and
scheduler) and steps it: each step prefills the policy's next batch, then runs one decode step for every
running sequence (continuous batching); finished sequences leave at once and their KV memory is freed. An output
thread turns the engine thread's token events into text deltas (``outputs.OutputProcessor``) and
hands them to the front end's ``on_output``. Every request gets exactly one final output, whether
it finishes, is aborted, misses its deadline, fails or is still queued at shutdown. A forward pass
that fails fails only the requests it was running.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable

from bucketserve.engine.core import EngineCore
from bucketserve.engine.executor import Executor
from bucketserve.engine.monitor import Monitor, Snapshot
from bucketserve.engine.outputs import OutputProcessor, RequestOutput
from bucketserve.engine.request import FinishReason, InvalidInput, Priority, Request, SamplingParams, check_slo_ms
from bucketserve.engine.scheduler import Scheduler
from bucketserve.engine.tokenizer import PromptTokenizer, check_lengths, check_prompt_bytes

OnOutput = Callable[[list[RequestOutput]], None]
POLL_S = 0.5
"""How long the idle threads block before they look again for a stop."""


def lower_priority() -> None:
    """Run the calling helper thread (text, responses) at the lowest CPU priority (nice 19). When the model's
    threads occupy every core, a helper that preempts one of them stalls the whole parallel region, which
    waits for its slowest thread; at the lowest priority it runs in the gaps between regions instead.
    Measured through Triton on 2 cores: +4-5% output tok/s and lower TPOT (default model, peers)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: the thread just keeps its priority
        pass


class Engine:
    def __init__(self, executor: Executor, scheduler: Scheduler, tokenizer: PromptTokenizer, on_output: OnOutput,
                 log: Callable[[str], None] = print, monitor: Monitor | None = None, max_queue_size: int = 0,
                 slo_expiry: float = 0.0):
        self.tokenizer = tokenizer
        self.on_output = on_output
        self.log = log
        self.max_queue_size = max_queue_size
        self._arriving = 0  # submitted, not yet taken from the inbox
        self._arriving_lock = threading.Lock()
        self._inbox: queue.Queue = queue.Queue()
        self._events: queue.Queue = queue.Queue()
        self.core = EngineCore(executor, scheduler, self._events.put, log, monitor, slo_expiry)
        self.executor, self.scheduler, self.monitor = executor, scheduler, self.core.monitor
        self._outputs = OutputProcessor(tokenizer.tokenizer, self.abort)
        self._thread = threading.Thread(target=self._loop, name="bucketserve-engine", daemon=True)
        self._output_thread = threading.Thread(target=self._output_loop, name="bucketserve-output", daemon=True)
        self._stopping = False

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_len

    @property
    def stats(self) -> Snapshot:
        return self.monitor.snapshot()

    def start(self) -> None:
        self._output_thread.start()
        self._thread.start()

    def make_request(self, prompt: str, sampling: SamplingParams, priority: Priority = Priority.ONLINE,
                     slo_ms: int | None = None, timeout_ms: float | None = None,
                     prompt_ids: list[int] | None = None) -> Request:
        """Tokenize (unless ``prompt_ids`` are given) and check a request; raise ``InvalidInput`` with what
        is wrong when it could never run. A front end registers where its outputs go, then submits it."""
        check_slo_ms(slo_ms)
        if prompt_ids is None:
            check_prompt_bytes(prompt, self.max_model_len, self.tokenizer.max_token_bytes)
            prompt_ids = self.tokenizer.encode(prompt)
        elif not prompt_ids:
            raise InvalidInput("the prompt has no tokens")
        elif max(prompt_ids) >= self.tokenizer.vocab_size:
            raise InvalidInput(f"prompt token id {max(prompt_ids)} is not in the vocabulary ({self.tokenizer.vocab_size} tokens)")
        check_lengths(len(prompt_ids), sampling.max_tokens, self.max_model_len)
        request = Request(prompt, prompt_ids, sampling, Priority.parse(priority), slo_ms, timeout_ms)
        reason = self.scheduler.too_big(request)
        if reason is not None:
            raise InvalidInput(reason)
        return request

    def submit(self, request: Request) -> None:
        """Queue a request already tokenized and checked."""
        with self._arriving_lock:
            self._arriving += 1
        self._inbox.put(("add", request))

    def waiting(self) -> int:
        """Requests submitted and not yet admitted to the running set (any thread may ask)."""
        return self._arriving + len(self.scheduler.waiting)

    def queue_full(self) -> bool:
        """Whether ``max_queue_size`` requests already wait: the caller refuses new ones (UNAVAILABLE)."""
        return bool(self.max_queue_size) and self.waiting() >= self.max_queue_size

    def abort(self, request_id: int, reason: FinishReason = FinishReason.CANCELLED) -> None:
        """End a request early (cancelled by its client, or stopped by a stop string)."""
        self._inbox.put(("abort", (request_id, reason)))

    def stop(self, timeout: float = 30.0) -> None:
        """Finish every request still queued or running with an error, then stop both threads."""
        self._inbox.put(("stop", None))
        self._thread.join(timeout)
        self._events.put(None)
        self._output_thread.join(timeout)

    def _output_loop(self) -> None:
        lower_priority()
        while True:
            batches = [self._events.get()]
            while True:  # take everything that piled up: a lagging consumer gets it coalesced
                try:
                    batches.append(self._events.get_nowait())
                except queue.Empty:
                    break
            stop = batches[-1] is None
            outputs = self._outputs.process([e for events in batches if events is not None for e in events])
            if outputs:
                try:
                    self.on_output(outputs)
                except Exception as e:  # the front end's bug must not stop outputs to everyone else
                    self.log(f"output callback failed: {type(e).__name__}: {e}")
            if stop:
                return

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, item = self._inbox.get(block=block, timeout=POLL_S if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                with self._arriving_lock:
                    self._arriving -= 1
                self.core.add(item)
            elif kind == "abort":
                self.core.abort(*item)
            elif kind == "stop":
                self._stopping = True

    def _loop(self) -> None:
        while not self._stopping:
            self._drain_inbox(block=not self.core.has_work())
            if self._stopping:
                break
            self.core.step()
        self.core.shutdown()
