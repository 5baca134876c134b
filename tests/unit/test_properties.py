"""Properties of the plain-Python scheduling core (buckets, memory, policies), checked by hypothesis
on random queues and on a simulated engine that admits, decodes one token a step and retires."""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from bucketserve.engine.buckets import Bucket, BucketManager, BucketRules
from bucketserve.engine.memory import KVBudget
from bucketserve.engine.policy import BucketPolicy, ContinuousPolicy, Ordering, StaticPolicy, StepContext
from bucketserve.engine.request import FinishReason, Request, SamplingParams
from bucketserve.engine.scheduler import Scheduler

L_MAX = 2048
lengths = st.lists(st.integers(min_value=1, max_value=L_MAX - 1), max_size=300)
rules = st.builds(BucketRules, theta=st.sampled_from([0.3, 0.5, 0.7]), merge_ratio=st.sampled_from([0.25, 0.5, 1.0]),
                  symmetric_split=st.booleans(), min_width=st.sampled_from([1, 16, 64]))


def req(length: int, max_tokens: int = 16, priority: int = 0, slo_ms: int | None = None, at: float = 0.0) -> Request:
    return Request("p", [0] * length, SamplingParams(max_tokens=max_tokens), priority=priority, slo_ms=slo_ms,
                   arrival_time=at)


def constant(n: int):
    return lambda _bucket: n


@settings(max_examples=150, deadline=None)
@given(rounds=st.lists(lengths, min_size=1, max_size=4), rule=rules, n_max=st.integers(1, 80))
def test_buckets_partition_the_range_and_hold_each_request_once(rounds, rule, n_max):
    manager = BucketManager(L_MAX, rule)
    for round_lengths in rounds:
        waiting = [req(n) for n in round_lengths]
        buckets = manager.update(waiting, constant(n_max))
        assert buckets[0].low == 0 and buckets[-1].up == L_MAX
        assert all(a.up == b.low and a.low < a.up for a, b in zip(buckets, buckets[1:]))
        placed = [id(r) for b in buckets for r in b.requests]
        assert sorted(placed) == sorted(map(id, waiting))
        assert all(r.prompt_len in b for b in buckets for r in b.requests)


@settings(max_examples=150, deadline=None)
@given(first=lengths, second=lengths, rule=rules, n_max=st.integers(1, 80))
def test_split_and_merge_follow_the_rules(first, second, rule, n_max):
    manager = BucketManager(L_MAX, rule)
    manager.update([req(n) for n in first], constant(n_max))
    before = list(manager.bounds)
    waiting = [req(n) for n in second]
    buckets = manager.update(waiting, constant(n_max))
    bounds = [b.low for b in buckets] + [L_MAX]
    if len(waiting) < rule.merge_ratio * n_max:
        assert bounds == [0, L_MAX]  # merged, and too few requests to split again
    else:
        assert set(before) <= set(bounds)  # above the merge mark, boundaries only ever get added
    # split is exhaustive: no bucket left that the rule would split
    for b in buckets:
        if len(b.requests) > n_max and b.up - b.low >= 2 * rule.min_width:
            mid = (b.low + b.up) // 2
            share = sum(r.prompt_len < mid for r in b.requests) / len(b.requests)
            assert share <= rule.theta and not (rule.symmetric_split and 1 - share > rule.theta)


@settings(max_examples=150, deadline=None)
@given(lens=lengths, rule=rules, n_max=st.integers(1, 80))
def test_the_whole_range_splits_only_when_crowded_and_lopsided(lens, rule, n_max):
    buckets = BucketManager(L_MAX, rule).update([req(n) for n in lens], constant(n_max))
    share = sum(n < L_MAX // 2 for n in lens) / len(lens) if lens else 0.0
    lopsided = share > rule.theta or (rule.symmetric_split and 1 - share > rule.theta)
    expected = len(lens) > n_max and len(lens) >= rule.merge_ratio * n_max and lopsided
    assert (len(buckets) > 1) == expected


class Sim:
    """A model-free engine: each step admits the policy's batch and gives every running request one token."""

    def __init__(self, policy, budget: KVBudget, max_num_seqs: int, max_prefill_tokens: int = 4096, dt: float = 0.01):
        self.scheduler = Scheduler(policy, budget, max_prefill_tokens, L_MAX, max_num_seqs)
        self.now = 0.0
        self.dt = dt
        self.step_no = 0
        self.admitted_at: dict[int, int] = {}
        self.arrived_at: dict[int, int] = {}
        self.batches: list[list[Request]] = []

    def add(self, request: Request) -> None:
        request.arrival_time = self.now
        self.arrived_at[request.id] = self.step_no
        self.scheduler.add(request)

    def step(self) -> list[Request]:
        batch = self.scheduler.next_prefill(self.now)
        for r in batch:
            self.admitted_at[r.id] = self.step_no
        if batch:
            self.batches.append(batch)
        budget = self.scheduler.budget
        assert budget.reserved(self.scheduler.running) <= budget.budget_bytes
        done = {}
        for r in self.scheduler.running:
            r.output_ids.append(1)
            if r.num_output >= r.sampling.max_tokens:
                done[r.id] = FinishReason.LENGTH
        self.scheduler.retire(done)
        self.now += self.dt
        self.step_no += 1
        return batch


workload = st.lists(st.tuples(st.integers(1, 1500), st.integers(1, 64), st.sampled_from([0, 1]),
                              st.sampled_from([None, 200, 1000])), min_size=1, max_size=120)


@settings(max_examples=60, deadline=None)
@given(jobs=workload, budget_rows=st.integers(1, 40), policy_name=st.sampled_from(["bucket", "continuous", "static"]),
       seed=st.integers(0, 1000))
def test_batches_respect_n_max_and_the_running_set_stays_in_budget(jobs, budget_rows, policy_name, seed):
    budget = KVBudget(bytes_per_token=2, budget_bytes=budget_rows * 1600 * 2, spare=16)
    policy = {"bucket": BucketPolicy(L_MAX, max_queue_delay_ms=30), "continuous": ContinuousPolicy(),
              "static": StaticPolicy()}[policy_name]
    sim = Sim(policy, budget, max_num_seqs=32)
    rng = random.Random(seed)
    pending = [req(n, m, p, s) for n, m, p, s in jobs]
    for _ in range(5000):
        for _ in range(rng.randint(0, 3)):
            if pending:
                sim.add(pending.pop())
        batch = sim.step()  # asserts the reservation of the running set after admission
        if batch and isinstance(policy, BucketPolicy):
            home = [b for b in policy.buckets if batch[0] in b.requests][0]
            assert all(r in home.requests for r in batch) and len(batch) <= policy.batch_limit(home)
        if not pending and not sim.scheduler.has_work():
            break
    assert not sim.scheduler.has_work(), "every request finishes"
    assert all(len(b) <= sim.scheduler.max_num_seqs for b in sim.batches)


@settings(max_examples=40, deadline=None)
@given(long_len=st.integers(200, 1500), short_len=st.integers(1, 100), aging_ms=st.sampled_from([100, 300]),
       order=st.sampled_from(["sjf", "ljf"]))
def test_a_continuous_stream_of_online_requests_cannot_starve_an_offline_one(long_len, short_len, aging_ms, order):
    """Online requests arrive a little faster than they are served, so online work always waits and,
    without aging, the offline request would never run. With aging it becomes urgent after two aging
    periods and then waits only for the online requests whose (aged) deadline is earlier than its own:
    those that arrived within the first aging period."""
    slots, short_tokens, every = 4, 20, 3
    budget = KVBudget(bytes_per_token=1, budget_bytes=slots * (1600 + 16), spare=16)
    policy = BucketPolicy(L_MAX, ordering=Ordering(offline_order=order, aging_ms=aging_ms), max_queue_delay_ms=0)
    sim = Sim(policy, budget, max_num_seqs=slots)
    for _ in range(slots):
        sim.add(req(short_len, max_tokens=short_tokens))
    sim.step()  # the running set is full before the offline request arrives
    victim = req(long_len, max_tokens=64, priority=1)
    sim.add(victim)
    for step in range(2000):
        if step % every == 0:
            sim.add(req(short_len, max_tokens=short_tokens))
        sim.step()
        if victim.id in sim.admitted_at:
            break
    aging_steps = aging_ms / 1000 / sim.dt
    ahead = aging_steps / every + slots + 1  # earlier deadlines, the running set, rounding
    bound = 2 * aging_steps + ahead * short_tokens / slots
    assert sim.admitted_at.get(victim.id, 10**9) <= bound
    assert sim.scheduler.waiting, "online requests were still queued: the offline one did overtake them"


@settings(max_examples=100, deadline=None)
@given(jobs=workload, now=st.floats(0.0, 5.0), order=st.sampled_from(["sjf", "ljf"]))
def test_batches_follow_the_priority_order(jobs, now, order):
    ordering = Ordering(offline_order=order, aging_ms=1000)
    rng = random.Random(len(jobs))
    waiting = [req(n, m, p, s, at=rng.uniform(0, now)) for n, m, p, s in jobs]
    policy = BucketPolicy(L_MAX, ordering=ordering)
    budget = KVBudget(bytes_per_token=1, budget_bytes=10**9)
    sched = Scheduler(policy, budget, 10**6, L_MAX, max_num_seqs=8)
    for r in waiting:
        sched.add(r)
    batch = sched.next_prefill(now)
    rank = lambda r: ordering.rank(r, now)  # noqa: E731
    home: Bucket = next(b for b in policy.buckets if batch[0] in b.requests)
    # the batch is the top of its bucket, in rank order ...
    assert batch == sorted(home.requests, key=rank)[:len(batch)]
    # ... and, with the engine idle and memory ample, its bucket holds the top request of all
    assert rank(batch[0]) == min(map(rank, waiting))


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(st.tuples(st.lists(st.tuples(st.integers(1, L_MAX - 17), st.integers(1, 64), st.integers(0, 1),
                                                   st.sampled_from([None, 500, 3000])), max_size=40),
                                 st.integers(0, 3), st.floats(0.0, 1.5), st.integers(1, 12)),
                       min_size=1, max_size=25),
       rule=rules, budget=st.integers(20_000, 200_000))
def test_a_policy_that_keeps_its_buckets_and_ranks_decides_as_one_that_starts_over(steps, rule, budget):
    """The bucket policy reuses its buckets and rank orders while the queue only shrinks and no rank can
    change; every decision must be the one a policy recomputing everything each time makes."""
    kept, fresh = BucketPolicy(L_MAX, rule, max_queue_delay_ms=10), BucketPolicy(L_MAX, rule, max_queue_delay_ms=10)
    kv = KVBudget(bytes_per_token=1, budget_bytes=budget)
    waiting: list[Request] = []
    left: list[Request] | None = []
    now, version = 0.0, 0
    rng = random.Random(len(steps))
    for arrivals, drops, gap, slots in steps:
        now += gap
        if arrivals:
            waiting += [req(n, m, p, s, at=now) for n, m, p, s in arrivals]
            version += 1
            left = None
        for _ in range(min(drops, len(waiting))):
            dropped = waiting.pop(rng.randrange(len(waiting)))
            left = None if left is None else [*left, dropped]
            version += 1
        ctx = StepContext(now, [], slots, 4096, kv, 64, packed=True, waiting_version=version, left=left)
        batch = kept.select(waiting, ctx)
        assert batch == fresh.select(waiting, replace(ctx, waiting_version=-1, left=None))
        assert kept.manager.bounds == fresh.manager.bounds
        left = list(batch)
        if batch:
            taken = set(map(id, batch))
            waiting = [r for r in waiting if id(r) not in taken]
            version += 1


class StartingOver(BucketPolicy):
    """The bucket policy deriving everything from the queue at every decision: the reference."""

    def select(self, waiting, ctx):
        return super().select(waiting, replace(ctx, waiting_version=-1, left=None))


@settings(max_examples=60, deadline=None)
@given(rule=rules, budget=st.integers(20_000, 400_000), seed=st.integers(0, 10_000))
def test_the_schedulers_views_and_decisions_match_a_queue_recounted_every_time(rule, budget, seed):
    """The scheduler tells its policy which requests left since its last decision and keeps its per-step views
    (requests waiting per bucket, per priority) from those changes; each must equal counting the queue."""
    rng = random.Random(seed)
    kept = Scheduler(BucketPolicy(L_MAX, rule, max_queue_delay_ms=10), KVBudget(1, budget), 4096, L_MAX, 48)
    fresh = Scheduler(StartingOver(L_MAX, rule, max_queue_delay_ms=10), KVBudget(1, budget), 4096, L_MAX, 48)
    ops = rng.choices(["arrive", "decide", "drop", "remove", "retire", "clear"], [8, 10, 1, 1, 6, 0.2], k=200)
    now, next_id = 0.0, 0
    for op in ops:
        now += rng.random() * 0.02
        if op == "arrive":
            for _ in range(rng.randint(1, 20)):
                length, out, priority = rng.randint(1, L_MAX - 17), rng.randint(1, 64), rng.randint(0, 1)
                for s in (kept, fresh):
                    s.add(Request("p", [0] * length, SamplingParams(max_tokens=out), priority=priority, id=next_id,
                                  arrival_time=now))
                next_id += 1
        elif op == "decide":
            assert [r.id for r in kept.next_prefill(now)] == [r.id for r in fresh.next_prefill(now)]
        elif op in ("drop", "remove") and kept.waiting:
            ids = {r.id for r in rng.sample(kept.waiting, min(rng.randint(1, 5), len(kept.waiting)))}
            for s in (kept, fresh):
                if op == "drop":
                    s.drop_waiting(ids)
                else:
                    s.remove_waiting(min(ids))
        elif op == "clear":  # a failed step empties both queues
            for s in (kept, fresh):
                s.clear()
        elif op == "retire" and kept.running:
            done = {r.id: FinishReason.LENGTH for r in rng.sample(kept.running, rng.randint(1, len(kept.running)))}
            for s in (kept, fresh):
                s.retire(done, now)
        online = sum(r.priority == 0 for r in kept.waiting)
        assert kept.waiting_by_priority() == (online, len(kept.waiting) - online)
        waiting = {r.id for r in kept.waiting}
        counted = tuple((b.low, b.up, sum(r.id in waiting for r in b.requests))
                        for b in kept.policy.buckets) or ((0, L_MAX, len(kept.waiting)),)
        assert tuple((v.low, v.up, v.requests) for v in kept.buckets()) == counted
