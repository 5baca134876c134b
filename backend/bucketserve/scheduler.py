"""The engine's bookkeeping: the waiting queue, the running set, and what each step runs."""

from __future__ import annotations

from collections import deque

from bucketserve.policy import AdmissionPolicy, StepLimits
from bucketserve.request import FinishReason, Request, Status


class Scheduler:
    def __init__(self, policy: AdmissionPolicy, max_num_seqs: int, max_prefill_tokens: int):
        self.policy = policy
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)

    def next_prefill(self) -> list[Request]:
        """Move the policy's choice from waiting to running; it is prefilled this step."""
        limits = StepLimits(self.max_num_seqs - len(self.running), self.max_prefill_tokens)
        if limits.free_slots <= 0 or not self.waiting:
            return []
        batch = self.policy.select(self.waiting, limits)
        chosen = set(map(id, batch))
        self.waiting = deque(r for r in self.waiting if id(r) not in chosen)
        for request in batch:
            request.status = Status.RUNNING
        self.running.extend(batch)
        return batch

    def remove_waiting(self, request_id: int) -> Request | None:
        for request in self.waiting:
            if request.id == request_id:
                self.waiting.remove(request)
                return request
        return None

    def retire(self, done: dict[int, FinishReason]) -> list[int]:
        """Finish the running requests named in ``done``; return the row indices that stay."""
        keep = []
        for row, request in enumerate(self.running):
            if request.id in done:
                request.finish(done[request.id])
            else:
                keep.append(row)
        self.running = [self.running[row] for row in keep]
        return keep
