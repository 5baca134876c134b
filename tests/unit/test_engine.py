"""The engine with a real model and no server: continuous batching must not change greedy tokens."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest

from bucketserve.config import EngineConfig
from bucketserve.engine import Engine, Event
from bucketserve.policy import POLICIES
from bucketserve.request import FinishReason, Request, SamplingParams
from bucketserve.runner import Runner
from bucketserve.scheduler import build_scheduler

PROMPTS = [
    "Hello",
    "def add(a, b):\n    return a + b\n" * 12,
    "The quick brown fox jumps over the lazy dog. " * 6,
    "import os\nimport sys\n",
    "class Config:\n    '''Settings for the engine.'''\n" * 25,
    "x = 1",
]


class Collector:
    """Records events per request and when each got its final one."""

    def __init__(self):
        self.tokens: dict[int, list[int]] = defaultdict(list)
        self.finals: dict[int, list[Event]] = defaultdict(list)
        self.done = threading.Condition()

    def __call__(self, events: list[Event]) -> None:
        with self.done:
            for e in events:
                self.tokens[e.request.id] += e.new_tokens
                if e.finish is not None:
                    self.finals[e.request.id].append(e)
            self.done.notify_all()

    def wait(self, ids: list[int], timeout: float = 120) -> None:
        with self.done:
            assert self.done.wait_for(lambda: all(i in self.finals for i in ids), timeout)


def new_engine(runner: Runner, max_num_seqs: int = 4, policy: str = "continuous",
               kv_cache_bytes: int = 1 << 30, max_queue_size: int = 0) -> tuple[Engine, Collector]:
    """An engine (not started) whose events go to a fresh Collector."""
    collector = Collector()
    config = EngineConfig(max_num_seqs=max_num_seqs, max_prefill_tokens=600, scheduler_policy=policy,
                          kv_cache_bytes=kv_cache_bytes, kv_safety=1.0)
    scheduler = build_scheduler(config, runner.kv_cost().bytes_per_token, None, runner.max_position_embeddings)
    return Engine(runner, scheduler, collector, max_queue_size=max_queue_size), collector


@pytest.fixture(scope="module")
def runner(model_dir):
    return Runner(str(model_dir), device="cpu", log=lambda _m: None)


@pytest.fixture
def engine(runner):
    engine, engine.collector = new_engine(runner)
    engine.start()
    yield engine
    engine.stop()


def make(runner: Runner, prompt: str, **sampling) -> Request:
    sampling.setdefault("temperature", 0.0)
    return Request(prompt, runner.tokenize(prompt), SamplingParams(**sampling))


@pytest.mark.parametrize("policy", POLICIES)
def test_staggered_arrivals_give_the_same_greedy_tokens_as_generate(runner, reference, policy):
    """Requests join and leave a shared, padded running set at different steps; at most 4 run at once."""
    engine, collector = new_engine(runner, policy=policy)
    engine.start()
    requests = [make(runner, p, max_tokens=8 + 5 * i) for i, p in enumerate(PROMPTS)]
    for r in requests:
        engine.submit(r)
        time.sleep(0.05)
    collector.wait([r.id for r in requests])
    engine.stop()
    for r in requests:
        expected = reference(r.prompt_ids, r.sampling.max_tokens)
        assert collector.tokens[r.id] == expected, r.prompt[:30]
        assert len(collector.finals[r.id]) == 1
    assert runner.kv_bytes() == 0 and runner.rows == []


def test_decode_groups_keep_greedy_tokens(runner, reference, monkeypatch):
    """With groups made free, batches decode in separate groups that merge and shrink as rows
    come and go; no token may change."""
    monkeypatch.setattr(runner, "group_cost_positions", 0)
    monkeypatch.setattr(runner, "max_decode_groups", 3)
    engine, collector = new_engine(runner, max_num_seqs=6)
    groups_seen = []
    engine.emit = lambda events, emit=engine.emit: (groups_seen.append(len(runner.groups)), emit(events))[1]
    engine.start()
    requests = [make(runner, p, max_tokens=6 + 4 * i) for i, p in enumerate(PROMPTS * 2)]
    for r in requests:
        engine.submit(r)
        time.sleep(0.03)
    collector.wait([r.id for r in requests])
    engine.stop()
    assert max(groups_seen) == 3
    for r in requests:
        assert collector.tokens[r.id] == reference(r.prompt_ids, r.sampling.max_tokens), r.prompt[:30]
    assert runner.groups == []


@pytest.mark.parametrize("policy", POLICIES)
def test_a_small_kv_budget_is_never_exceeded(runner, reference, policy):
    """Mixed lengths through a budget that holds only a few of them at a time: admission waits for
    room instead of overrunning it, and every request still completes with the right tokens."""
    per_token = runner.kv_cost().bytes_per_token
    budget = 3 * (400 + 64) * per_token  # about three long sequences, with the slabs' spare room
    engine, collector = new_engine(runner, max_num_seqs=16, policy=policy, kv_cache_bytes=budget)
    sizes = [(PROMPTS[i % len(PROMPTS)] * (1 + i % 3), 4 + 3 * (i % 5)) for i in range(14)]
    requests = [make(runner, p, max_tokens=n) for p, n in sizes]
    for r in requests:
        engine.submit(r)
    engine.start()
    collector.wait([r.id for r in requests])
    engine.stop()
    assert all(len(collector.finals[r.id]) == 1 and collector.finals[r.id][0].error is None for r in requests)
    peak = engine.stats.kv_peak_bytes  # recorded after every prefill and decode step
    assert peak > budget // 2, "the workload never came near the budget, so it tested nothing"
    assert peak <= budget
    for r in requests[::4]:
        assert collector.tokens[r.id] == reference(r.prompt_ids, r.sampling.max_tokens)


def test_a_request_larger_than_the_budget_fails_alone(runner):
    engine, collector = new_engine(runner, kv_cache_bytes=100 * runner.kv_cost().bytes_per_token)
    big, small = make(runner, PROMPTS[4], max_tokens=8), make(runner, "x", max_tokens=4)
    engine.submit(big)
    engine.submit(small)
    engine.start()
    collector.wait([big.id, small.id])
    engine.stop()
    assert "more than the budget" in collector.finals[big.id][0].error
    assert collector.finals[small.id][0].finish is FinishReason.LENGTH


def test_abort_frees_the_sequence(engine, runner):
    long = make(runner, PROMPTS[1], max_tokens=1000)
    engine.submit(long)
    deadline = time.monotonic() + 30
    while len(engine.collector.tokens[long.id]) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert engine.runner.kv_bytes() > 0
    engine.abort(long.id)
    engine.collector.wait([long.id])
    assert engine.collector.finals[long.id][0].finish is FinishReason.CANCELLED
    deadline = time.monotonic() + 10
    while engine.stats.running or engine.stats.kv_bytes:  # stats follow the step that emitted the final
        assert time.monotonic() < deadline, engine.stats
        time.sleep(0.01)


def test_abort_while_waiting_ends_the_request(runner):
    engine, collector = new_engine(runner, max_num_seqs=1)
    first, second = make(runner, "a", max_tokens=200), make(runner, "b", max_tokens=5)
    engine.submit(first)
    engine.submit(second)
    engine.abort(second.id)
    engine.start()
    collector.wait([second.id])
    assert collector.finals[second.id][0].finish is FinishReason.CANCELLED and collector.tokens[second.id] == []
    engine.stop()
    assert collector.finals[first.id][0].error == "the model is shutting down"  # one final, even at shutdown


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(engine, runner):
    alone = make(runner, "Once upon a time", max_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    engine.submit(alone)
    engine.collector.wait([alone.id])
    crowd = [make(runner, p, max_tokens=12, temperature=0.9, seed=i) for i, p in enumerate(PROMPTS[:3])]
    again = make(runner, "Once upon a time", max_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    for r in [*crowd, again]:
        engine.submit(r)
    engine.collector.wait([r.id for r in [*crowd, again]])
    assert engine.collector.tokens[again.id] == engine.collector.tokens[alone.id]
    other = make(runner, "Once upon a time", max_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=99)
    engine.submit(other)
    engine.collector.wait([other.id])
    assert engine.collector.tokens[other.id] != engine.collector.tokens[alone.id]


def test_max_tokens_bounds_length(engine, runner):
    r = make(runner, "Hello", max_tokens=6)
    engine.submit(r)
    engine.collector.wait([r.id])
    assert len(engine.collector.tokens[r.id]) == 6
    assert engine.collector.finals[r.id][0].finish is FinishReason.LENGTH


def test_a_failed_step_fails_its_requests_once_and_the_engine_keeps_serving(runner, reference, monkeypatch):
    real_decode = runner.decode
    calls = {"n": 0}

    def flaky_decode():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real_decode()

    monkeypatch.setattr(runner, "decode", flaky_decode)
    engine, collector = new_engine(runner)
    victims = [make(runner, p, max_tokens=50) for p in PROMPTS[:2]]
    for r in victims:
        engine.submit(r)
    engine.start()  # both join the first step's prefill; the second step's decode fails
    collector.wait([r.id for r in victims])
    for r in victims:
        finals = collector.finals[r.id]
        assert len(finals) == 1 and finals[0].finish is FinishReason.ERROR and finals[0].error
    assert runner.kv_bytes() == 0
    after = make(runner, PROMPTS[2], max_tokens=10)
    engine.submit(after)
    collector.wait([after.id])
    engine.stop()
    assert collector.tokens[after.id] == reference(after.prompt_ids, 10)


def test_a_request_finished_by_prefill_gets_its_final_even_if_that_steps_decode_fails(runner, monkeypatch):
    def broken_decode():
        raise RuntimeError("injected failure")

    monkeypatch.setattr(runner, "decode", broken_decode)
    engine, collector = new_engine(runner)
    survivor, victim = make(runner, "a", max_tokens=1), make(runner, "b", max_tokens=50)
    engine.submit(survivor)
    engine.submit(victim)
    engine.start()  # both are drained before the first step, so they share its prefill batch
    collector.wait([survivor.id, victim.id])
    engine.stop()
    assert [e.finish for e in collector.finals[survivor.id]] == [FinishReason.LENGTH]
    assert [e.finish for e in collector.finals[victim.id]] == [FinishReason.ERROR]


def test_the_waiting_queue_is_bounded_and_frees_up_as_requests_run(runner):
    engine, collector = new_engine(runner, max_num_seqs=2, max_queue_size=3)
    burst = [make(runner, p, max_tokens=4) for p in PROMPTS[:3]]
    for r in burst:
        assert not engine.queue_full()
        engine.submit(r)
    assert engine.waiting() == 3 and engine.queue_full()  # nothing admitted yet: the engine is not started
    engine.start()
    collector.wait([r.id for r in burst])
    assert engine.waiting() == 0 and not engine.queue_full()
    later = make(runner, PROMPTS[3], max_tokens=4)
    engine.submit(later)
    collector.wait([later.id])
    engine.stop()
    assert all(len(collector.finals[r.id]) == 1 for r in [*burst, later])
