"""The engine's bookkeeping: the waiting queue, the running set, and what each step runs.

Only the engine thread changes them; other threads may read their lengths, so both lists are changed
in place and never replaced by new objects."""

from __future__ import annotations

import collections
import heapq
import itertools
import operator
import time
from typing import Any, Callable

from bucketserve.engine.buckets import BucketRules
from bucketserve.config import EngineConfig
from bucketserve.engine.memory import KVBudget, final_length, safe_budget
from bucketserve.engine.monitor import BucketView
from bucketserve.engine.policy import AdmissionPolicy, BucketPolicy, ContinuousPolicy, Ordering, StaticPolicy, StepContext
from bucketserve.engine.request import FinishReason, Priority, Request, Status

PRIORITY = operator.attrgetter("priority")


def make_policy(config: EngineConfig, max_len: int) -> AdmissionPolicy:
    if config.scheduler_policy == "continuous":
        return ContinuousPolicy()
    if config.scheduler_policy == "fcfs_static":
        return StaticPolicy()
    rules = BucketRules(config.bucket_theta, config.bucket_merge_ratio, config.bucket_symmetric_split,
                        config.bucket_min_width)
    ordering = Ordering(config.offline_order, config.aging_ms, config.deadline_urgency)
    return BucketPolicy(max_len, rules, ordering, config.max_queue_delay_ms)


def build_scheduler(config: EngineConfig, bytes_per_token: int, device_free: int | None, max_len: int,
                    page_size: int = 0, chunked: bool = False) -> "Scheduler":
    """The scheduler a config describes: its policy and its KV budget (M_safe). ``page_size`` > 0: the
    executor keeps KV in pages of that many positions and prefills packed; 0: padded caches and batches.
    ``chunked``: the executor can prefill a prompt in chunks over several steps."""
    budget_bytes = safe_budget(config.kv_safety, config.kv_cache_bytes, config.kv_cache_memory_fraction, device_free)
    budget = KVBudget(bytes_per_token, budget_bytes, 0 if page_size else config.kv_cache_growth, page_size)
    return Scheduler(make_policy(config, max_len), budget, config.max_prefill_tokens, max_len, config.max_num_seqs,
                     chunked)


class Scheduler:
    def __init__(self, policy: AdmissionPolicy, budget: KVBudget, max_prefill_tokens: int, max_len: int,
                 max_num_seqs: int = 1 << 30, chunked: bool = False):
        self.policy = policy
        self.budget = budget
        self.max_prefill_tokens = max_prefill_tokens
        self.chunked = chunked
        """A prompt that does not fit a step's prefill tokens is prefilled in chunks, one per step (else: alone,
        whole)."""
        self.max_len = max_len
        self.max_num_seqs = max_num_seqs
        """Most sequences in the running set at once (a slot limit, not a memory one)."""
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.last_select_s = 0.0
        """How long the last policy decision (bucketing included) took."""
        self._by_length: list[tuple[int, int, Request]] = []
        """Heap of (final length, id, request) over the waiting requests; entries of requests that left are
        dropped when they reach the top."""
        self._changes = 0
        """Counts changes to the waiting set, so per-step views of it are computed once per change."""
        self._views: dict[str, Any] = {}
        self._views_key: tuple[int, int] = (-1, 0)
        self._gone: list[Request] = []
        """Requests that left the waiting set since the policy's last decision."""
        self._new: set[int] = set()
        """Ids of the requests that arrived since the policy's last decision."""
        self._cleared = False
        """The queues were emptied since the policy's last decision."""
        self._online = 0
        """Online requests in the waiting set."""

    def n_max(self) -> int:
        """N_max of the whole length range: how many sequences of the longest allowed length fit."""
        return min(self.max_num_seqs, self.budget.seqs_that_fit(self.max_len))

    def buckets(self) -> tuple[BucketView, ...]:
        """The buckets of the last decision with the requests still waiting in each; one bucket
        over the whole range for policies without buckets."""
        return self._view("buckets", self._buckets)

    def _buckets(self) -> tuple[BucketView, ...]:
        buckets = self.policy.buckets if isinstance(self.policy, BucketPolicy) else None
        if not buckets:
            return (BucketView(0, self.max_len, len(self.waiting), self.n_max()),)
        if self._cleared:  # rare (a failed step): count
            waiting = set(map(id, self.waiting))
            return tuple(BucketView(b.low, b.up, sum(map(waiting.__contains__, map(id, b.requests))),
                                    self.policy.batch_limit(b)) for b in buckets)
        # each bucket held the whole waiting set at the last decision: less those that left since
        left = collections.Counter(map(self.policy.manager.index, (r for r in self._gone if r.id not in self._new)))
        return tuple(BucketView(b.low, b.up, len(b.requests) - left[i], self.policy.batch_limit(b))
                     for i, b in enumerate(buckets))

    def _view(self, name: str, compute: Callable[[], Any]) -> Any:
        """A view of the waiting set that the engine reads every step, recomputed only when the waiting set or
        the policy's buckets changed: with thousands waiting, computing it every step dominated the step."""
        key = (self._changes, id(getattr(self.policy, "buckets", None)))
        if key != self._views_key:
            self._views, self._views_key = {}, key
        if name not in self._views:
            self._views[name] = compute()
        return self._views[name]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def too_big(self, request: Request) -> str | None:
        """Why the request can never run (its KV alone exceeds the budget, so it would wait forever)."""
        if self.budget.fits([request]):
            return None
        return (f"prompt ({request.prompt_len} tokens) + max_tokens ({request.sampling.max_tokens}) needs "
                f"{self.budget.reserved([request])} bytes of KV cache, more than the budget of "
                f"{self.budget.budget_bytes} (kv_cache_bytes)")

    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)
        heapq.heappush(self._by_length, (final_length(request), request.id, request))
        self._changes += 1
        self._new.add(request.id)
        self._online += request.priority == Priority.ONLINE

    def _left(self, requests: list[Request]) -> None:
        """Bookkeeping for requests that just left the waiting set."""
        self._gone.extend(requests)
        self._online -= list(map(PRIORITY, requests)).count(Priority.ONLINE)
        self._changes += 1

    def _none_fits(self) -> bool:
        """Whether the KV budget is too full for even the smallest waiting request: then no policy admits
        anything (each stops at its first request that does not fit), and the decision is skipped."""
        heap = self._by_length
        while heap and heap[0][2].status is not Status.WAITING:
            heapq.heappop(heap)
        if not heap:
            return False  # requests put on the list by hand: let the policy decide
        usage = self.budget.plus(self.budget.usage(self.running), heap[0][2])
        return self.budget.bytes_of(usage) > self.budget.budget_bytes

    def next_prefill(self, now: float | None = None) -> list[Request]:
        """The requests prefilled this step, each up to its ``prefill_to``: the prompt in progress (chunked) goes
        on first, then the policy's choice moves from waiting to running.

        The step computes at most ``max_prefill_tokens`` prompt tokens. A prompt in progress takes all of them
        when nothing waits, half while requests wait (so that those, online first, get in within a step); the
        policy fills the rest, and when chunking, its last request may get only a first chunk. One prompt at a
        time is in progress, so admitted prompts never wait half done behind each other."""
        in_progress = [r for r in self.running if r.prefilled < r.prompt_len] if self.chunked else []
        budget = self.max_prefill_tokens
        for request in in_progress:
            share = budget - budget // 2 if self.waiting else budget
            request.prefill_to = min(request.prompt_len, request.prefilled + max(1, share))
            budget -= request.prefill_to - request.prefilled
        batch = self._admit(now, budget, may_chunk=self.chunked and not in_progress) if budget > 0 else []
        for request in batch:
            request.prefill_to = min(request.prompt_len, budget) if self.chunked else request.prompt_len
            budget -= request.prefill_to
        return in_progress + batch

    def _admit(self, now: float | None, budget: int, may_chunk: bool) -> list[Request]:
        """Move the policy's choice within ``budget`` prompt tokens from waiting to running."""
        free = self.max_num_seqs - len(self.running)
        if free <= 0 or not self.waiting or self._none_fits():
            self.last_select_s = 0.0
            return []
        start = time.perf_counter()
        ctx = StepContext(time.monotonic() if now is None else now, self.running, free, budget,
                          self.budget, self.max_num_seqs, packed=bool(self.budget.page_size),
                          waiting_version=self._changes,
                          left=None if self._new or self._cleared else self._gone, chunked=self.chunked,
                          may_chunk=may_chunk)
        batch = self.policy.select(self.waiting, ctx)
        self.last_select_s = time.perf_counter() - start
        self._gone, self._new, self._cleared = [], set(), False
        if not batch:
            return []
        chosen = set(map(id, batch))
        # the queue less the batch, iterated in C: with thousands waiting a comprehension was a tenth of a step
        self.waiting[:] = itertools.compress(self.waiting, map(operator.not_, map(chosen.__contains__, map(id, self.waiting))))
        self._left(batch)
        for request in batch:
            request.status = Status.RUNNING
        self.running.extend(batch)
        return batch

    def remove_waiting(self, request_id: int) -> Request | None:
        for request in self.waiting:
            if request.id == request_id:
                self.waiting.remove(request)
                self._left([request])
                return request
        return None

    def drop_waiting(self, ids: set[int]) -> None:
        if ids:
            dropped = [r for r in self.waiting if r.id in ids]
            self.waiting[:] = [r for r in self.waiting if r.id not in ids]
            self._left(dropped)

    def retire(self, done: dict[int, FinishReason], now: float | None = None) -> None:
        """Finish the running requests named in ``done`` (at ``now``); they leave the running set."""
        for request in self.running:
            if request.id in done:
                request.finish(done[request.id], now)
        self.running[:] = [r for r in self.running if r.id not in done]

    def clear(self) -> list[Request]:
        """Empty both queues (a failed step, or shutdown); return what they held."""
        held = self.waiting + self.running
        self.waiting.clear()
        self.running.clear()
        self._by_length.clear()
        self._changes += 1
        self._cleared = True
        self._online = 0
        return held

    def waiting_by_priority(self) -> tuple[int, int]:
        return self._online, len(self.waiting) - self._online
