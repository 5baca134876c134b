"""Admission policies and the scheduler, without a model: examples with known answers."""

from __future__ import annotations

from bucketserve.engine.memory import KVBudget
from bucketserve.engine.policy import BucketPolicy, ContinuousPolicy, Ordering, StaticPolicy, StepContext
from bucketserve.engine.request import FinishReason, Request, SamplingParams, Status
from bucketserve.engine.scheduler import Scheduler

BIG = KVBudget(bytes_per_token=1, budget_bytes=10**12)


def req(length: int, max_tokens: int = 16, priority: int = 0, slo_ms: int | None = None, at: float = 0.0) -> Request:
    return Request("p", list(range(length)), SamplingParams(max_tokens=max_tokens), priority=priority, slo_ms=slo_ms,
                   arrival_time=at)


def ctx(free: int = 64, tokens: int = 10**6, budget: KVBudget = BIG, running=(), now: float = 0.0) -> StepContext:
    return StepContext(now, list(running), free, tokens, budget)


def test_continuous_respects_slots_and_token_budget_without_overtaking():
    waiting = [req(10), req(10), req(100), req(1)]
    assert ContinuousPolicy().select(waiting, ctx(free=8, tokens=150)) == waiting[:2]
    assert ContinuousPolicy().select(waiting, ctx(free=1)) == waiting[:1]
    # a lone request bigger than the token cap still runs, or it would wait forever
    assert ContinuousPolicy().select([req(500)], ctx(free=4, tokens=100))[0].prompt_len == 500


def test_the_kv_budget_counts_the_padded_running_set_and_max_tokens():
    budget = KVBudget(bytes_per_token=1, budget_bytes=4 * 110, spare=10)
    running = [req(90, max_tokens=10)]  # final length 100 -> every row of the set is 100 + 10 wide
    waiting = [req(5, max_tokens=5), req(5, max_tokens=5), req(5, max_tokens=5), req(5, max_tokens=5)]
    assert ContinuousPolicy().select(waiting, ctx(budget=budget, running=running)) == waiting[:3]
    assert budget.reserved([*running, *waiting[:3]]) == 4 * 110
    assert ContinuousPolicy().select([req(205, max_tokens=10)], ctx(budget=budget, running=running)) == []


def test_static_batches_run_to_completion():
    waiting = [req(10), req(20)]
    assert StaticPolicy().select(waiting, ctx(running=[req(3)])) == []
    assert StaticPolicy().select(waiting, ctx()) == waiting


def bucket_policy(**kw) -> BucketPolicy:
    return BucketPolicy(max_len=1024, ordering=Ordering(**kw))


def test_bucket_batches_come_from_one_bucket_holding_the_oldest_request():
    budget = KVBudget(bytes_per_token=1, budget_bytes=4 * 1100)  # N_max 4 for the whole range
    short = [req(10 + i, at=1.0 + i) for i in range(6)]
    long = [req(900, at=0.5), req(950, at=2.0)]
    policy = bucket_policy()
    batch = policy.select([*short, *long], ctx(budget=budget, now=10.0))
    assert len(policy.buckets) > 1
    assert batch == long  # the oldest request is long: its bucket goes first, and only its bucket
    assert len({next(i for i, b in enumerate(policy.buckets) if r in b.requests) for r in batch}) == 1
    batch = policy.select(short, ctx(budget=budget, now=10.0))
    assert batch == sorted(batch, key=lambda r: r.arrival_time) and all(r.prompt_len < 64 for r in batch)


def test_offline_requests_go_shortest_or_longest_job_first():
    jobs = [req(40, max_tokens=m, priority=1) for m in (50, 5, 500, 20)]
    sjf = bucket_policy(offline_order="sjf").select(jobs, ctx(free=2))
    ljf = bucket_policy(offline_order="ljf").select(jobs, ctx(free=2))
    assert [r.sampling.max_tokens for r in sjf] == [5, 20]
    assert [r.sampling.max_tokens for r in ljf] == [500, 50]


def test_online_before_offline_then_deadlines_and_aging_lift_requests():
    order = Ordering(aging_ms=1000, deadline_urgency=0.5)
    offline, online = req(10, priority=1, at=0.0), req(10, priority=0, at=0.5)
    assert order.rank(online, now=0.6) < order.rank(offline, now=0.6)
    assert order.rank(offline, now=1.2) < order.rank(online, now=1.2)  # aged one class, and older
    urgent = req(10, priority=1, slo_ms=400, at=0.5)
    assert order.rank(urgent, now=0.6) > order.rank(online, now=0.6)
    assert order.rank(urgent, now=0.75) < order.rank(online, now=0.75)  # half its slo_ms has passed


def test_requests_with_an_slo_are_ordered_by_their_deadline_not_aged_ahead_of_it():
    """Found by the 10x burst: aging gave a 4 s old offline request (slo 10 s) the deadline "arrival +
    4 s", already past, so an offline backlog went before every online request until the SLOs ran out."""
    order = Ordering(aging_ms=2000, deadline_urgency=0.5)
    backlog = req(10, priority=1, slo_ms=10_000, at=0.0)
    online = req(10, priority=0, slo_ms=1000, at=3.9)
    assert order.rank(online, now=4.5) < order.rank(backlog, now=4.5)  # online is urgent; backlog is not yet
    assert order.rank(backlog, now=5.1)[0] == 0  # half its SLO: urgent, with its own deadline
    assert order.rank(online, now=4.5)[1] < order.rank(backlog, now=5.1)[1]


def test_a_bucket_that_cannot_fill_waits_for_its_queue_delay_while_the_engine_is_busy():
    policy = BucketPolicy(max_len=1024, max_queue_delay_ms=100)
    waiting = [req(10, at=1.0)]
    assert policy.select(waiting, ctx(running=[req(5)], now=1.05)) == []
    assert policy.select(waiting, ctx(running=[req(5)], now=1.2)) == waiting
    assert policy.select(waiting, ctx(now=1.05)) == waiting  # the engine would idle


def test_scheduler_admits_and_retires():
    s = Scheduler(ContinuousPolicy(), KVBudget(1, 10**9), max_prefill_tokens=1000, max_len=2048, max_num_seqs=2)
    a, b, c = req(3), req(4), req(5)
    for r in (a, b, c):
        s.add(r)
    assert s.next_prefill() == [a, b] and a.status is Status.RUNNING
    assert s.next_prefill() == []  # running set full
    s.retire({a.id: FinishReason.LENGTH})
    assert a.status is Status.FINISHED and a.finish_reason is FinishReason.LENGTH
    assert s.next_prefill() == [c] and s.running == [b, c]
    assert s.remove_waiting(c.id) is None
