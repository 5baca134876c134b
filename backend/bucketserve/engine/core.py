"""The engine's step: the scheduler's next prefill batch (whole prompts, or the next chunk of a long one), one
token for every running sequence, and every request's end (finished, aborted, late, failed) as events. An
executor with ``unified_step`` runs the prefill and the decode as one forward; others run two.

One caller owns a core and calls it from one thread: the engine thread in a server, or a simulator that
runs it in simulated time (``clock``) over an executor that only computes how long each step takes. So
the core never blocks, starts no thread, and reads the time only through ``clock``.
"""

from __future__ import annotations

import heapq
import time
import traceback
from typing import Callable

from bucketserve.engine.executor import Executor, StepOutput
from bucketserve.engine.monitor import Monitor
from bucketserve.engine.outputs import Event
from bucketserve.engine.request import FinishReason, Request, Status
from bucketserve.engine.scheduler import Scheduler

Emit = Callable[[list[Event]], None]
Clock = Callable[[], float]


class EngineCore:
    def __init__(self, executor: Executor, scheduler: Scheduler, emit: Emit, log: Callable[[str], None] = print,
                 monitor: Monitor | None = None, slo_expiry: float = 0.0, clock: Clock = time.monotonic):
        self.executor = executor
        self.scheduler = scheduler
        self._emit = emit
        self.log = log
        self.clock = clock
        self.monitor = monitor or Monitor(scheduler.budget.budget_bytes, clock=clock)
        self.slo_expiry = slo_expiry
        self._aborted: dict[int, FinishReason] = {}
        self._expiries: list[tuple[float, int, Request]] = []
        """Heap of (when its deadline passes, id, request) over waiting requests that have one, so a step
        looks only at those due rather than at the whole queue."""

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def emit(self, events: list[Event]) -> None:
        for event in events:
            if event.finish is not None:
                self.monitor.on_finish(event.request)
        self._emit(events)

    def add(self, request: Request) -> None:
        """A new request waits for the scheduler, or ends at once if its KV alone exceeds the budget."""
        self.monitor.on_arrival()
        reason = self.scheduler.too_big(request)
        if reason is None:
            self.scheduler.add(request)
            expires = request.expires_at(self.slo_expiry)
            if expires is not None:
                heapq.heappush(self._expiries, (expires, request.id, request))
            return
        request.finish(FinishReason.ERROR, self.clock())
        self.emit([Event(request, [], FinishReason.ERROR, error=reason)])

    def abort(self, request_id: int, reason: FinishReason) -> None:
        """A waiting request ends now; a running one at the start of the next step (not in the middle of one)."""
        waiting = self.scheduler.remove_waiting(request_id)
        if waiting is not None:
            waiting.finish(reason, self.clock())
            self.emit([Event(waiting, [], reason)])
        else:
            self._aborted[request_id] = reason

    def step(self) -> None:
        """One engine step; one that fails fails the requests it was running, and the engine goes on."""
        start = self.clock()
        try:
            self._step()
        except Exception:
            self._fail_all_running(traceback.format_exc())
        s = self.scheduler
        self.monitor.on_step(self.clock() - start, s.last_select_s, s.waiting_by_priority(), len(s.running),
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
            batch = self.scheduler.next_prefill(self.clock())
            # every running request part way through its prompt is in the batch: the others decode this step
            decoding = len(self.scheduler.running) - len(batch)
            if batch:
                lengths = [r.prefill_end - r.prefilled for r in batch]
                # in a unified step the decode rows share the forward, and its padding rounds them too
                riding = decoding if self.executor.unified_step else 0
                self.monitor.on_prefill(lengths, self.executor.prefill_positions(lengths, riding),
                                        bool(self.executor.page_size))
            if self.executor.unified_step:
                if batch or decoding:
                    out = self.executor.step(batch)
                    self._prefilled(batch, out, events)
                    if decoding:
                        self.monitor.on_decode(*self.executor.last_decode_positions)
                    self._apply(out, events)
            else:
                if batch:
                    out = self.executor.prefill(batch)
                    self._prefilled(batch, out, events)
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

    def _prefilled(self, batch: list[Request], out: StepOutput, events: list[Event]) -> None:
        """The batch's prompts are computed up to ``prefill_end``; a first token that came too late is not sent."""
        for request in batch:
            request.prefilled = request.prefill_end
        firsts = {r.id for r in batch}
        self._expire_running([r for r in out.rows if r.id in firsts], events)

    def _apply(self, out: StepOutput, events: list[Event]) -> None:
        """Record a step's tokens; the rows whose forward failed end with an error, the rest go on."""
        self.monitor.on_kv(self.executor.kv_bytes())
        now = self.clock()
        done: dict[int, FinishReason] = {}
        for request, token in zip(out.rows, out.tokens):
            if request.finish_reason is not None:  # expired just now
                continue
            logprobs = out.logprobs.get(request.id)
            reason = request.append_token(token, self.executor.eos_ids, now)
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
        now = self.clock()
        late = [(r, why) for r in requests if (why := r.missed_deadline(now, self.slo_expiry))]
        events += [Event(r, [], FinishReason.DEADLINE, error=why) for r, why in late]
        return [r for r, _ in late]

    def _expire_waiting(self, events: list[Event]) -> None:
        now, due = self.clock(), []
        while self._expiries and self._expiries[0][0] <= now:
            entry = heapq.heappop(self._expiries)
            if entry[2].status is Status.WAITING:
                due.append(entry)
        late = self._late([request for _, _, request in due], events)
        for entry in due:  # not late after all (rounding at the boundary): look again next step
            if entry[2] not in late:
                heapq.heappush(self._expiries, entry)
        self.scheduler.drop_waiting({r.id for r in late})
        for request in late:
            request.finish(FinishReason.DEADLINE, now)

    def _expire_running(self, requests: list[Request], events: list[Event]) -> None:
        self._retire({r.id: FinishReason.DEADLINE for r in self._late(requests, events)})

    def _retire(self, done: dict[int, FinishReason]) -> None:
        """Finished requests leave the running set and their KV rows are freed."""
        if done:
            self.scheduler.retire(done, self.clock())
            self.executor.drop(set(done))

    def _fail_all_running(self, trace: str) -> None:
        self.log(f"engine step failed; failing its {len(self.scheduler.running)} running requests:\n{trace}")
        failed = list(self.scheduler.running)
        self.scheduler.running.clear()
        self.executor.reset()
        now = self.clock()
        for request in failed:
            request.finish(FinishReason.ERROR, now)
        self.emit([Event(r, [], FinishReason.ERROR, error="internal error in the engine step") for r in failed])

    def shutdown(self) -> None:
        """Every request still waiting or running ends with an error."""
        pending = self.scheduler.clear()
        self.executor.reset()
        now = self.clock()
        for request in pending:
            request.finish(FinishReason.ERROR, now)
        if pending:
            self.emit([Event(r, [], FinishReason.ERROR, error="the model is shutting down") for r in pending])
