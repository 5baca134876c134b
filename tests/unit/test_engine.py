"""The engine with a real model and no server: continuous batching must not change greedy tokens."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest
import torch

from bucketserve.config import EngineConfig
from bucketserve.engine import Engine, Event
from bucketserve.faults import FaultPlan, InjectedFault, parse_rule
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


def new_engine(runner: Runner, max_num_seqs: int = 4, policy: str = "continuous", kv_cache_bytes: int = 1 << 30,
               max_queue_size: int = 0, slo_expiry: float = 0.0) -> tuple[Engine, Collector]:
    """An engine (not started) whose events go to a fresh Collector."""
    collector = Collector()
    config = EngineConfig(max_num_seqs=max_num_seqs, max_prefill_tokens=600, scheduler_policy=policy,
                          kv_cache_bytes=kv_cache_bytes, kv_safety=1.0)
    scheduler = build_scheduler(config, runner.kv_cost().bytes_per_token, None, runner.max_position_embeddings)
    return Engine(runner, scheduler, collector, max_queue_size=max_queue_size, slo_expiry=slo_expiry), collector


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


def faults(runner: Runner, monkeypatch, *rules: str) -> None:
    monkeypatch.setattr(runner, "fault_hook", FaultPlan([parse_rule(r) for r in rules], oom_error=torch.OutOfMemoryError))


def wait_for_tokens(collector: Collector, request: Request, n: int) -> None:
    deadline = time.monotonic() + 60
    while len(collector.tokens[request.id]) < n:
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_a_failing_row_fails_alone_and_its_batch_mates_go_on(runner, reference, monkeypatch, stage):
    """The victim shares its prefill batch and decode group with others: the failed forward is undone
    and retried in halves until only the victim's own forward fails."""
    faults(runner, monkeypatch, f"{stage}:error:text=BOOM")
    engine, collector = new_engine(runner, max_num_seqs=6)
    mates = [make(runner, p, max_tokens=30) for p in PROMPTS[:5]]
    victim = make(runner, "BOOM " + PROMPTS[2], max_tokens=30)
    for r in [*mates[:3], victim, *mates[3:]]:
        engine.submit(r)
    engine.start()  # queued together, they share prefill batches and decode groups
    collector.wait([r.id for r in [*mates, victim]])
    after = make(runner, PROMPTS[3], max_tokens=10)
    engine.submit(after)
    collector.wait([after.id])
    engine.stop()
    [final] = collector.finals[victim.id]
    assert final.finish is FinishReason.ERROR and "InjectedFault" in final.error
    assert len(collector.tokens[victim.id]) == (0 if stage == "prefill" else 1)  # decode: its prefill token came
    for r in [*mates, after]:
        assert [e.error for e in collector.finals[r.id]] == [None]
        assert collector.tokens[r.id] == reference(r.prompt_ids, r.sampling.max_tokens)
    assert engine.stats.failed == 1 and runner.groups == [] and runner.kv_bytes() == 0


def test_out_of_memory_is_retried_in_halves_without_changing_a_token(runner, reference, monkeypatch):
    """Every forward of more than one row runs out of memory: prefill batches and decode groups are
    split down to single rows over the same KV slabs, and greedy tokens stay exactly generate()'s."""
    faults(runner, monkeypatch, "prefill:oom:rows>1", "decode:oom:rows>1")
    monkeypatch.setattr(runner, "kv_cache_growth", 3)  # slabs regrow often, also while split
    retries = runner.oom_retries
    engine, collector = new_engine(runner, max_num_seqs=5)
    requests = [make(runner, p, max_tokens=12 + 3 * i) for i, p in enumerate(PROMPTS[:5])]
    for r in requests:
        engine.submit(r)
    engine.start()  # all five share the first prefill batch and then one decode group
    collector.wait([r.id for r in requests])
    engine.stop()
    for r in requests:
        assert [e.error for e in collector.finals[r.id]] == [None]
        assert collector.tokens[r.id] == reference(r.prompt_ids, r.sampling.max_tokens), r.prompt[:30]
    assert runner.oom_retries - retries > 12 and engine.stats.oom_retries == runner.oom_retries


def test_a_row_out_of_memory_alone_fails_and_the_engine_keeps_serving(runner, reference, monkeypatch):
    faults(runner, monkeypatch, "decode:oom:text=BOOM")
    engine, collector = new_engine(runner)
    victim = make(runner, "BOOM", max_tokens=20)
    engine.submit(victim)
    engine.start()
    collector.wait([victim.id])
    after = make(runner, PROMPTS[0], max_tokens=8)
    engine.submit(after)
    collector.wait([after.id])
    engine.stop()
    assert "OutOfMemoryError" in collector.finals[victim.id][0].error
    assert collector.tokens[after.id] == reference(after.prompt_ids, 8)


def test_fault_rules_parse_and_refuse_nonsense():
    rule = parse_rule("decode:oom:rows>2")
    assert rule.fires("decode", [object()] * 3) and not rule.fires("decode", [object()] * 2)
    assert not rule.fires("prefill", [object()] * 3)
    with pytest.raises(InjectedFault):
        FaultPlan([parse_rule("prefill:error:text=X")], MemoryError)("prefill", [make_prompt("aXb")])
    for bad in ("decode:oom", "encode:oom:rows>1", "decode:crash:rows>1", "decode:oom:rows>x", "decode:oom:text="):
        with pytest.raises(ValueError):
            parse_rule(bad)


def make_prompt(text: str) -> Request:
    return Request(text, [1], SamplingParams())


def test_a_request_past_its_timeout_ends_waiting_or_running_and_frees_its_kv(runner):
    engine, collector = new_engine(runner, max_num_seqs=1)
    running = make(runner, PROMPTS[1], max_tokens=2000)
    running.timeout_ms = 1500
    queued = make(runner, "x", max_tokens=4)
    queued.timeout_ms = 300
    engine.submit(running)
    engine.submit(queued)
    engine.start()
    collector.wait([running.id, queued.id])
    [late], [expired] = collector.finals[running.id], collector.finals[queued.id]
    assert expired.finish is FinishReason.DEADLINE and collector.tokens[queued.id] == []
    assert "timeout of 300 ms passed after 0 output tokens" in expired.error
    assert late.finish is FinishReason.DEADLINE and 0 < len(collector.tokens[running.id]) < 2000
    assert "timeout of 1500 ms" in late.error
    deadline = time.monotonic() + 10
    while engine.stats.kv_bytes:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    engine.stop()
    assert engine.stats.expired == 2


@pytest.mark.parametrize("slo_expiry", [0.0, 1.0])
def test_a_request_that_can_no_longer_get_its_first_token_in_time_is_ended(runner, slo_expiry):
    engine, collector = new_engine(runner, max_num_seqs=1, slo_expiry=slo_expiry)
    blocker = make(runner, PROMPTS[0], max_tokens=60)
    hopeful = make(runner, "x", max_tokens=4)
    hopeful = Request(hopeful.prompt, hopeful.prompt_ids, hopeful.sampling, slo_ms=50)
    engine.submit(blocker)
    engine.submit(hopeful)
    engine.start()
    collector.wait([blocker.id, hopeful.id])
    engine.stop()
    [final] = collector.finals[hopeful.id]
    if slo_expiry:
        assert final.finish is FinishReason.DEADLINE and "past slo_ms 50 x slo_expiry 1" in final.error
    else:  # 0: late requests still run
        assert final.finish is FinishReason.LENGTH and len(collector.tokens[hopeful.id]) == 4
    assert collector.finals[blocker.id][0].finish is FinishReason.LENGTH
