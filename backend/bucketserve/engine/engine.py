"""The engine: a request's whole life, from prompt text to its one final output.

``make_request`` tokenizes and checks a prompt on the caller's thread (a bad one raises
``InvalidInput`` at once); ``submit`` queues it. One engine thread owns the executor and the scheduler: each
step it prefills the policy's next batch, then runs one decode step for every running sequence
(continuous batching); finished sequences leave at once and their KV memory is freed. An output
thread turns the engine thread's token events into text deltas (``outputs.OutputProcessor``) and
hands them to the front end's ``on_output``. Every request gets exactly one final output, whether
it finishes, is aborted, misses its deadline, fails or is still queued at shutdown. A forward pass
that fails fails only the requests it was running.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from typing import Callable

from bucketserve.engine.executor import Executor, StepOutput
from bucketserve.engine.monitor import Monitor, Snapshot
from bucketserve.engine.outputs import Event, OutputProcessor, RequestOutput
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
        self.executor = executor
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.on_output = on_output
        self.log = log
        self.monitor = monitor or Monitor(scheduler.budget.budget_bytes)
        self.max_queue_size = max_queue_size
        self.slo_expiry = slo_expiry
        self._arriving = 0  # submitted, not yet taken from the inbox
        self._arriving_lock = threading.Lock()
        self._inbox: queue.Queue = queue.Queue()
        self._events: queue.Queue = queue.Queue()
        self._aborted: dict[int, FinishReason] = {}
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

    def emit(self, events: list[Event]) -> None:
        for event in events:
            if event.finish is not None:
                self.monitor.on_finish(event.request)
        self._events.put(events)

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
                self._add(item)
            elif kind == "abort":
                request_id, reason = item
                waiting = self.scheduler.remove_waiting(request_id)
                if waiting is not None:
                    waiting.finish(reason)
                    self.emit([Event(waiting, [], reason)])
                else:
                    self._aborted[request_id] = reason
            elif kind == "stop":
                self._stopping = True

    def _add(self, request: Request) -> None:
        self.monitor.on_arrival()
        reason = self.scheduler.too_big(request)
        if reason is None:
            self.scheduler.add(request)
            return
        request.finish(FinishReason.ERROR)
        self.emit([Event(request, [], FinishReason.ERROR, error=reason)])

    def _loop(self) -> None:
        while not self._stopping:
            self._drain_inbox(block=not self.scheduler.has_work())
            if self._stopping:
                break
            start = time.perf_counter()
            try:
                self._step()
            except Exception:
                self._fail_all_running(traceback.format_exc())
            self._record(time.perf_counter() - start)
        self._shutdown()

    def _record(self, step_s: float) -> None:
        s = self.scheduler
        self.monitor.on_step(step_s, s.last_select_s, s.waiting_by_priority(), len(s.running),
                             self.executor.kv_bytes(), s.budget.reserved(s.running), s.buckets(), s.n_max())

    def _step(self) -> None:
        events: list[Event] = []
        try:
            aborted = {r.id: self._aborted[r.id] for r in self.scheduler.running if r.id in self._aborted}
            self._aborted.clear()
            events += [Event(r, [], aborted[r.id]) for r in self.scheduler.running if r.id in aborted]
            self._retire(aborted)
            self._expire_waiting(events)
            self._expire_running(self.scheduler.running, events)
            batch = self.scheduler.next_prefill()
            if batch:
                lengths = [r.prompt_len for r in batch]
                self.monitor.on_prefill(lengths, self.executor.prefill_positions(lengths), bool(self.executor.page_size))
                out = self.executor.prefill(batch)
                self._expire_running(out.rows, events)  # a first token that came too late is not sent
                self._apply(out, events)
            if self.scheduler.running:
                out = self.executor.decode()
                self.monitor.on_decode(*self.executor.last_decode_positions)
                self._apply(out, events)
            self.monitor.on_oom_retries(self.executor.oom_retries)
        finally:
            # also when the step fails: requests it already finished must get their final event
            if events:
                self.emit(events)

    def _apply(self, out: StepOutput, events: list[Event]) -> None:
        """Record a step's tokens; the rows whose forward failed end with an error, the rest go on."""
        self.monitor.on_kv(self.executor.kv_bytes())
        done: dict[int, FinishReason] = {}
        for request, token in zip(out.rows, out.tokens):
            if request.finish_reason is not None:  # expired just now
                continue
            logprobs = out.logprobs.get(request.id)
            reason = request.append_token(token, self.executor.eos_ids)
            if reason is not None:
                done[request.id] = reason
            events.append(Event(request, [token], reason, logprobs=[logprobs] if logprobs else []))
        if out.failed:
            why = "; ".join(sorted({message for _, message in out.failed}))
            self.log(f"forward passes failed even for single rows; failing those {len(out.failed)} requests: {why}")
            done.update({r.id: FinishReason.ERROR for r, _ in out.failed})
            events += [Event(r, [], FinishReason.ERROR, error=f"internal error in the model: {message}")
                       for r, message in out.failed]
        self._retire(done)

    def _late(self, requests: list[Request], events: list[Event]) -> list[Request]:
        """The requests whose deadline can no longer be met (so computing on is waste), each with its event."""
        now = time.monotonic()
        late = [(r, why) for r in requests if (why := r.missed_deadline(now, self.slo_expiry))]
        events += [Event(r, [], FinishReason.DEADLINE, error=why) for r, why in late]
        return [r for r, _ in late]

    def _expire_waiting(self, events: list[Event]) -> None:
        late = self._late(self.scheduler.waiting, events)
        self.scheduler.drop_waiting({r.id for r in late})
        for request in late:
            request.finish(FinishReason.DEADLINE)

    def _expire_running(self, requests: list[Request], events: list[Event]) -> None:
        self._retire({r.id: FinishReason.DEADLINE for r in self._late(requests, events)})

    def _retire(self, done: dict[int, FinishReason]) -> None:
        """Finished requests leave the running set and their KV rows are freed."""
        if done:
            self.scheduler.retire(done)
            self.executor.drop(set(done))

    def _fail_all_running(self, trace: str) -> None:
        self.log(f"engine step failed; failing its {len(self.scheduler.running)} running requests:\n{trace}")
        failed = list(self.scheduler.running)
        self.scheduler.running.clear()
        self.executor.reset()
        for request in failed:
            request.finish(FinishReason.ERROR)
        self.emit([Event(r, [], FinishReason.ERROR, error="internal error in the engine step") for r in failed])

    def _shutdown(self) -> None:
        pending = self.scheduler.clear()
        self.executor.reset()
        for request in pending:
            request.finish(FinishReason.ERROR)
        if pending:
            self.emit([Event(r, [], FinishReason.ERROR, error="the model is shutting down") for r in pending])
