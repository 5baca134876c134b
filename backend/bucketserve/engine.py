"""The engine thread: owns the model, admits waiting requests, and advances the running set.

``submit`` and ``abort`` may be called from any thread; they only enqueue. Each step the thread
prefills the policy's next batch, then runs one decode step for every running sequence
(continuous batching): finished sequences leave at once and their KV memory is freed. Every
request gets exactly one final event, whether it finishes, is aborted, misses its deadline, fails or
is still queued at shutdown. A forward pass that fails fails only the requests it was running.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

from bucketserve.monitor import Monitor, Snapshot
from bucketserve.request import FinishReason, Request
from bucketserve.runner import Runner, StepOutput
from bucketserve.scheduler import Scheduler


@dataclass
class Event:
    request: Request
    new_tokens: list[int]
    finish: FinishReason | None = None
    error: str | None = None


Emit = Callable[[list[Event]], None]


class Engine:
    def __init__(self, runner: Runner, scheduler: Scheduler, emit: Emit, log: Callable[[str], None] = print,
                 monitor: Monitor | None = None, max_queue_size: int = 0, slo_expiry: float = 0.0):
        self.runner = runner
        self.max_queue_size = max_queue_size
        self.slo_expiry = slo_expiry
        self._arriving = 0  # submitted, not yet taken from the inbox
        self._arriving_lock = threading.Lock()
        self.scheduler = scheduler
        self._emit_to = emit
        self.log = log
        self.monitor = monitor or Monitor(scheduler.budget.budget_bytes)
        self._inbox: queue.Queue = queue.Queue()
        self._aborted: dict[int, FinishReason] = {}
        self._thread = threading.Thread(target=self._loop, name="bucketserve-engine", daemon=True)
        self._stopping = False

    @property
    def stats(self) -> Snapshot:
        return self.monitor.snapshot()

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> None:
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
        """End a request early (cancelled by its client, or stopped by a stop word)."""
        self._inbox.put(("abort", (request_id, reason)))

    def stop(self, timeout: float = 30.0) -> None:
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, item = self._inbox.get(block=block, timeout=0.5 if block else None)
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

    def emit(self, events: list[Event]) -> None:
        for event in events:
            if event.finish is not None:
                self.monitor.on_finish(event.request)
        self._emit_to(events)

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
                self._fail_running(traceback.format_exc())
            self._record(time.perf_counter() - start)
        self._shutdown()

    def _record(self, step_s: float) -> None:
        s = self.scheduler
        online = sum(1 for r in s.waiting if r.priority == 0)
        self.monitor.on_step(step_s, s.last_select_s, (online, len(s.waiting) - online), len(s.running),
                             self.runner.kv_bytes(), s.budget.reserved(s.running), s.buckets(), s.n_max())

    def _step(self) -> None:
        events: list[Event] = []
        try:
            aborted = {r.id: self._aborted[r.id] for r in self.scheduler.running if r.id in self._aborted}
            self._aborted.clear()
            events += [Event(r, [], aborted[r.id]) for r in self.scheduler.running if r.id in aborted]
            self._retire(aborted)
            self._expire(events)
            batch = self.scheduler.next_prefill()
            if batch:
                self.monitor.on_prefill([r.prompt_len for r in batch])
                self._apply(self.runner.prefill(batch), events)
            if self.scheduler.running:
                out = self.runner.decode()
                self.monitor.on_decode(*self.runner.last_decode_positions)
                self._apply(out, events)
            self.monitor.on_oom_retries(self.runner.oom_retries)
        finally:
            # also when the step fails: requests it already finished must get their final event
            if events:
                self.emit(events)

    def _apply(self, out: StepOutput, events: list[Event]) -> None:
        """Record a step's tokens; the rows whose forward failed end with an error, the rest go on."""
        self.monitor.on_kv(self.runner.kv_bytes())
        done = self._advance(out.rows, out.tokens, events)
        if out.failed:
            why = "; ".join(sorted({message for _, message in out.failed}))
            self.log(f"forward passes failed even for single rows; failing those {len(out.failed)} requests: {why}")
            done.update({r.id: FinishReason.ERROR for r, _ in out.failed})
            events += [Event(r, [], FinishReason.ERROR, error=f"internal error in the model: {message}")
                       for r, message in out.failed]
        self._retire(done)

    def _expire(self, events: list[Event]) -> None:
        """End the requests whose deadline can no longer be met, waiting or running, before they take
        another step's compute."""
        now = time.monotonic()
        expired = [(r, why) for r in self.scheduler.waiting if (why := r.missed_deadline(now, self.slo_expiry))]
        self.scheduler.drop_waiting({r.id for r, _ in expired})
        late = [(r, why) for r in self.scheduler.running if (why := r.missed_deadline(now, self.slo_expiry))]
        self._retire({r.id: FinishReason.DEADLINE for r, _ in late})
        for request, _ in expired:
            request.finish(FinishReason.DEADLINE)
        events += [Event(r, [], FinishReason.DEADLINE, error=why) for r, why in expired + late]

    def _advance(self, requests: list[Request], tokens: list[int], events: list[Event]) -> dict[int, FinishReason]:
        """Record one new token per request; return the requests that are now done."""
        done: dict[int, FinishReason] = {}
        for request, token in zip(requests, tokens):
            reason = request.append_token(token, self.runner.eos_ids)
            if reason is not None:
                done[request.id] = reason
            events.append(Event(request, [token], reason))
        return done

    def _retire(self, done: dict[int, FinishReason]) -> None:
        """Finished requests leave the running set and their KV rows are freed."""
        if done:
            self.scheduler.retire(done)
            self.runner.drop(set(done))

    def _fail_running(self, trace: str) -> None:
        self.log(f"engine step failed; failing its {len(self.scheduler.running)} running requests:\n{trace}")
        failed = self.scheduler.running
        self.scheduler.running = []
        self.runner.reset()
        for request in failed:
            request.finish(FinishReason.ERROR)
        self.emit([Event(r, [], FinishReason.ERROR, error="internal error in the engine step") for r in failed])

    def _shutdown(self) -> None:
        pending = list(self.scheduler.waiting) + self.scheduler.running
        self.scheduler.waiting.clear()
        self.scheduler.running = []
        self.runner.reset()
        for request in pending:
            request.finish(FinishReason.ERROR)
        if pending:
            self.emit([Event(r, [], FinishReason.ERROR, error="the model is shutting down") for r in pending])
