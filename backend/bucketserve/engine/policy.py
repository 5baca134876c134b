"""Admission policies: which waiting requests form the next prefill batch.

The scheduler asks its policy once per engine step. Every policy takes requests in its own order
while they fit the step's limits: free slots in the running set, prefill tokens, and the
KV budget (the running set plus the batch, each sequence reserved at prompt + max_tokens; see memory.py). It stops
at the first request that does not fit, so nobody is overtaken by a smaller request behind it.

- ``fcfs_static``: Triton's dynamic batcher on a padded model: arrival order, one batch runs to
  completion before the next is formed.
- ``continuous``: arrival order, joining the running set every step (vLLM-like admission).
- ``bucket``: BucketServe: length buckets, one bucket per batch, priority and deadline order.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Protocol, Sequence

from bucketserve.engine.buckets import Bucket, BucketManager, BucketRules
from bucketserve.engine.memory import KVBudget, final_length
from bucketserve.engine.request import Priority, Request


@dataclass(frozen=True)
class StepContext:
    now: float
    running: Sequence[Request]
    free_slots: int
    max_prefill_tokens: int
    """Padded tokens (batch size x longest prompt) one prefill batch may hold."""
    budget: KVBudget
    max_num_seqs: int = 1 << 30
    """Most sequences in the running set: no batch is larger, whatever memory allows."""
    packed: bool = False
    """Prefill runs packed (its cost is the prompts' tokens), not padded (batch size x longest prompt)."""
    waiting_version: int = -1
    """Changes whenever the waiting set does (-1: unknown), so a policy may keep what it derived from it."""
    left: Sequence[Request] | None = None
    """The requests that left the waiting set since the policy's last decision, when none arrived (None:
    unknown, or some arrived): a policy may take them out of what it derived instead of starting over."""
    chunked: bool = False
    """The executor prefills long prompts in chunks: a request that does not fit ``max_prefill_tokens`` no longer
    runs alone, whole; it waits, or gets a first chunk when ``may_chunk``."""
    may_chunk: bool = False
    """The batch's last request may be one that does not fit ``max_prefill_tokens``: it gets a first chunk now."""


class AdmissionPolicy(Protocol):
    def select(self, waiting: Sequence[Request], ctx: StepContext) -> list[Request]: ...


def fill(candidates: Sequence[Request], ctx: StepContext, limit: int | None = None) -> list[Request]:
    """Take ``candidates`` in order while the batch fits; stop at the first that does not.

    Without chunking, a lone request longer than ``max_prefill_tokens`` still runs (alone), or it would wait
    forever. With ``may_chunk``, the first request past the prefill tokens joins (its prompt is then prefilled in
    chunks), as long as tokens are left for its first chunk.
    """
    limit = ctx.free_slots if limit is None else min(limit, ctx.free_slots)
    usage = ctx.budget.usage(ctx.running)
    batch: list[Request] = []
    widest = tokens = 0
    for request in candidates:
        if len(batch) >= limit:
            break
        widest_next, tokens_next = max(widest, request.prompt_len), tokens + request.prompt_len
        cost = tokens_next if ctx.packed else (len(batch) + 1) * widest_next
        over = cost > ctx.max_prefill_tokens
        if over and (batch or ctx.chunked) and not (ctx.may_chunk and tokens < ctx.max_prefill_tokens):
            break
        usage_next = ctx.budget.plus(usage, request)
        if ctx.budget.bytes_of(usage_next) > ctx.budget.budget_bytes:
            break
        batch.append(request)
        widest, tokens, usage = widest_next, tokens_next, usage_next
        if over:  # alone, or chunked: nothing after it this step
            break
    return batch


class ContinuousPolicy:
    """Arrival order, admitted into the running set as soon as it has room."""

    def select(self, waiting: Sequence[Request], ctx: StepContext) -> list[Request]:
        return fill(waiting, ctx)


class StaticPolicy:
    """Arrival order; the next batch forms only when the previous one has completely finished."""

    def select(self, waiting: Sequence[Request], ctx: StepContext) -> list[Request]:
        return [] if ctx.running else fill(waiting, ctx)


@dataclass(frozen=True)
class Ordering:
    offline_order: str = "sjf"
    """Offline requests: ``sjf`` (shortest job first: more requests/s) or ``ljf`` (longest: more tokens/s)."""
    aging_ms: float = 2000.0
    """Each aging_ms a request waits lifts it one class: offline -> online -> urgent."""
    deadline_urgency: float = 0.5
    """A request with slo_ms becomes urgent once this share of its slo_ms has passed."""

    def rank(self, request: Request, now: float) -> tuple:
        """Sort key; lower runs sooner. Classes: 0 urgent (earliest deadline first), 1 online
        (oldest first), 2 offline (SJF or LJF). A request with ``slo_ms`` turns urgent (deadline
        arrival + slo_ms) once ``deadline_urgency`` of it has passed; one without is lifted a class per
        ``aging_ms`` it waits, urgent with a deadline of when it got there, so nothing starves."""
        waited_ms = (now - request.arrival_time) * 1000
        base = 1 if request.priority == Priority.ONLINE else 2
        if request.slo_ms is not None:
            # its own deadline keeps it from starving; aging it too would give it an earlier deadline than
            # its SLO, and under overload an aged offline backlog would then go before every online request
            if waited_ms >= self.deadline_urgency * request.slo_ms:
                return (0, request.arrival_time + request.slo_ms / 1000, request.id)
            tier = base
        else:
            tier = base - int(waited_ms // self.aging_ms)
        if tier <= 0:
            return (0, request.arrival_time + base * self.aging_ms / 1000, request.id)
        if tier == 1:
            return (1, request.arrival_time, request.id)
        job = final_length(request)
        return (2, job if self.offline_order == "sjf" else -job, request.arrival_time, request.id)

    def rank_changes(self, request: Request, now: float) -> float:
        """When the request's rank next changes (inf: never again); ``rank`` holds until then."""
        waited_ms = (now - request.arrival_time) * 1000
        if request.slo_ms is not None:
            urgent_ms = self.deadline_urgency * request.slo_ms
            return math.inf if waited_ms >= urgent_ms else request.arrival_time + urgent_ms / 1000
        base = 1 if request.priority == Priority.ONLINE else 2
        aged = int(waited_ms // self.aging_ms)
        return math.inf if base - aged <= 0 else request.arrival_time + (aged + 1) * self.aging_ms / 1000


class BucketPolicy:
    """BucketServe: batches come from one length bucket at a time, sized by that bucket's N_max.

    The bucket holding the highest-ranked request goes first (online: the oldest request). A bucket
    dispatches when its batch is full (N_max, free slots or memory), when its oldest request has
    waited ``max_queue_delay_ms``, when it holds an urgent request, or when the engine would idle.
    """

    def __init__(self, max_len: int, rules: BucketRules = BucketRules(), ordering: Ordering = Ordering(),
                 max_queue_delay_ms: float = 0.0):
        self.manager = BucketManager(max_len, rules)
        self.ordering = ordering
        self.max_queue_delay_s = max_queue_delay_ms / 1000
        self.buckets: list[Bucket] = []
        self._ctx: StepContext | None = None
        self._limits: dict[int, tuple[Bucket, int]] = {}
        """batch_limit of each bucket, by identity (a bucket's requests never change: one that loses some is
        replaced), kept while the bucket stands."""
        self._limit_inputs: tuple[int, int] = (0, 0)
        """What batch_limit depends on besides a bucket's requests (the budget, max_num_seqs); the cached limits
        and buckets hold only while it stays the same."""
        self._version = -1
        self._ranked: list[tuple[tuple, Bucket, list[Request], float]] = []
        """Buckets by their top request's rank: (its rank, the bucket, its requests in rank order, oldest arrival)."""
        self._ranked_until = -math.inf
        self._keys: dict[int, tuple] = {}
        """Each ranked request's rank, by id, valid until _ranked_until."""

    def batch_limit(self, bucket: Bucket) -> int:
        """The bucket's N_max: how many of its longest requests (its upper bound plus the largest
        max_tokens among them) the KV budget holds, within max_num_seqs; at least 1."""
        assert self._ctx is not None
        known = self._limits.get(id(bucket))
        if known is not None and known[0] is bucket:
            return known[1]
        out = max(map(MAX_TOKENS, bucket.requests), default=0)
        limit = max(1, min(self._ctx.max_num_seqs, self._ctx.budget.seqs_that_fit(bucket.up - 1 + out)))
        self._limits[id(bucket)] = (bucket, limit)
        return limit

    def select(self, waiting: Sequence[Request], ctx: StepContext) -> list[Request]:
        self._ctx = ctx
        inputs = (id(ctx.budget), ctx.max_num_seqs)
        same_inputs = inputs == self._limit_inputs
        if ctx.waiting_version < 0 or ctx.waiting_version != self._version or not same_inputs:
            # bucketing is idempotent: the same waiting set gives the same buckets, so redo it only on change
            incremental = ctx.waiting_version >= 0 and ctx.left is not None and same_inputs
            self._limit_inputs = inputs
            if not (incremental and self._shrink(ctx.left, waiting, ctx)):
                self._limits.clear()
                self.buckets = self.manager.update(waiting, self.batch_limit, self._most(ctx))
                self._ranked_until = -math.inf
            self._version = ctx.waiting_version
        if ctx.now >= self._ranked_until:
            self._rank(ctx.now)
        for position, (top, bucket, order, oldest) in enumerate(self._ranked):
            n_max = self.batch_limit(bucket)
            batch = fill(order, ctx, n_max)
            if not batch:
                if position == 0 and top[0] == 0:
                    return []  # hold memory back for the most urgent request rather than let it starve
                continue
            full = len(batch) < len(bucket.requests) or len(batch) >= n_max
            if full or top[0] == 0 or not ctx.running or ctx.now - oldest >= self.max_queue_delay_s:
                return batch
        return []

    @staticmethod
    def _most(ctx: StepContext) -> int:
        """No bucket's batch_limit exceeds this: the bucket manager skips computing limits it cannot reach."""
        return max(1, ctx.max_num_seqs)

    def _shrink(self, left: Sequence[Request], waiting: Sequence[Request], ctx: StepContext) -> bool:
        """When requests only left the queue (a batch was taken, some expired), take them out of the buckets
        they were in and out of those buckets' rank orders, keeping every other bucket as it was, instead of
        sorting the queue again; the result is the same. False: it cannot (no buckets yet), and the caller
        starts over."""
        if not self.buckets:
            return False
        gone = set(map(ID, left))
        kept = list(self.buckets)
        for i in set(map(self.manager.index, left)):
            b = kept[i]
            kept[i] = Bucket(b.low, b.up, [r for r in b.requests if r.id not in gone])
        merges = self.manager.merges
        self.buckets = self.manager.refit(kept, waiting, self.batch_limit, self._most(ctx))
        current = {id(b) for b in self.buckets}
        self._limits = {k: v for k, v in self._limits.items() if k in current}
        if self.manager.merges != merges or ctx.now >= self._ranked_until:
            self._ranked_until = -math.inf
            return True
        standing = {id(entry[1]): entry for entry in self._ranked}
        ranked = []
        for bucket in self.buckets:
            if not bucket.requests:
                continue
            entry = standing.get(id(bucket))
            if entry is None:  # lost requests or split off: its order is its parent's, less those gone
                parent = next(order for _, old, order, _ in self._ranked if old.low <= bucket.low and bucket.up <= old.up)
                members = set(map(ID, bucket.requests))
                order = [r for r in parent if r.id in members]
                entry = (self._keys[order[0].id], bucket, order, min(map(ARRIVAL, bucket.requests)))
            ranked.append(entry)
        ranked.sort(key=lambda item: item[0])
        self._ranked = ranked
        return True

    def _rank(self, now: float) -> None:
        """Each bucket's requests in rank order, buckets by their top request; kept until a rank can change
        (a request turns urgent or ages a class), so a long queue is not sorted again every step."""
        ranked = []
        self._keys = {r.id: self.ordering.rank(r, now) for b in self.buckets for r in b.requests}
        for bucket in self.buckets:
            if bucket.requests:
                order = sorted(bucket.requests, key=lambda r: self._keys[r.id])
                ranked.append((self._keys[order[0].id], bucket, order, min(r.arrival_time for r in bucket.requests)))
        ranked.sort(key=lambda item: item[0])
        self._ranked = ranked
        changes = (self.ordering.rank_changes(r, now) for b in self.buckets for r in b.requests)
        self._ranked_until = min(changes, default=math.inf) - RANK_MARGIN_S


MAX_TOKENS, ID, ARRIVAL = (operator.attrgetter(a) for a in ("sampling.max_tokens", "id", "arrival_time"))

RANK_MARGIN_S = 1e-6
"""Ranks are computed again this long before one can change, so rounding at the boundary cannot keep a stale one."""


POLICIES = ("bucket", "continuous", "fcfs_static")
