from __future__ import annotations

from bucketserve.policy import FCFSPolicy, StepLimits
from bucketserve.request import FinishReason, Request, SamplingParams, Status
from bucketserve.scheduler import Scheduler


def req(length: int) -> Request:
    return Request("p", list(range(length)), SamplingParams())


def test_fcfs_respects_slots_and_token_budget_without_overtaking():
    waiting = [req(10), req(10), req(100), req(1)]
    assert FCFSPolicy().select(waiting, StepLimits(free_slots=8, max_prefill_tokens=150)) == waiting[:2]
    assert FCFSPolicy().select(waiting, StepLimits(free_slots=1, max_prefill_tokens=10_000)) == waiting[:1]
    # a lone request bigger than the budget still runs, or it would wait forever
    assert FCFSPolicy().select([req(500)], StepLimits(4, 100))[0].prompt_len == 500


def test_scheduler_admits_and_retires():
    s = Scheduler(FCFSPolicy(), max_num_seqs=2, max_prefill_tokens=1000)
    a, b, c = req(3), req(4), req(5)
    for r in (a, b, c):
        s.add(r)
    assert s.next_prefill() == [a, b] and a.status is Status.RUNNING
    assert s.next_prefill() == []  # running set full
    assert s.retire({a.id: FinishReason.LENGTH}) == [1]
    assert a.status is Status.FINISHED and a.finish_reason is FinishReason.LENGTH
    assert s.next_prefill() == [c] and s.running == [b, c]
    assert s.remove_waiting(c.id) is None
