"""The engine with a real model and no server: continuous batching must not change greedy tokens."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest

from bucketserve.config import EngineConfig
from bucketserve.engine.engine import Engine
from bucketserve.engine.outputs import RequestOutput
from bucketserve.engine.policy import POLICIES
from bucketserve.engine.request import FinishReason, Request, SamplingParams
from bucketserve.factory import LoadedModel, build_engine
from tests.waiting import wait_for

PROMPTS = [
    "Hello",
    "def add(a, b):\n    return a + b\n" * 12,
    "The quick brown fox jumps over the lazy dog. " * 6,
    "import os\nimport sys\n",
    "class Config:\n    '''Settings for the engine.'''\n" * 25,
    "x = 1",
]


class Collector:
    """Records outputs per request and when each got its final one."""

    def __init__(self):
        self.tokens: dict[int, list[int]] = defaultdict(list)
        self.finals: dict[int, list[RequestOutput]] = defaultdict(list)
        self.done = threading.Condition()

    def __call__(self, outputs: list[RequestOutput]) -> None:
        with self.done:
            for o in outputs:
                self.tokens[o.request.id] += o.token_ids
                if o.finished:
                    self.finals[o.request.id].append(o)
            self.done.notify_all()

    def wait(self, ids: list[int], timeout: float = 120) -> None:
        with self.done:
            assert self.done.wait_for(lambda: all(i in self.finals for i in ids), timeout)


def new_engine(model: LoadedModel, max_num_seqs: int = 4, policy: str = "continuous", kv_cache_bytes: int = 1 << 30,
               max_queue_size: int = 0, slo_expiry: float = 0.0, max_prefill_tokens: int = 600) -> tuple[Engine, Collector]:
    """An engine (not started) whose outputs go to a fresh Collector, built as every front end builds one."""
    collector = Collector()
    config = EngineConfig(max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens, scheduler_policy=policy,
                          kv_cache_bytes=kv_cache_bytes, kv_safety=1.0, max_queue_size=max_queue_size,
                          slo_expiry=slo_expiry)
    return build_engine(config, model, collector, log=lambda _m: None), collector


@pytest.fixture
def engine(model):
    engine, engine.collector = new_engine(model)
    engine.start()
    yield engine
    engine.stop()


def make(model: LoadedModel, prompt: str, **sampling) -> Request:
    sampling.setdefault("temperature", 0.0)
    return Request(prompt, model.tokenizer.encode(prompt), SamplingParams(**sampling))


@pytest.mark.parametrize("policy", POLICIES)
def test_staggered_arrivals_give_the_same_greedy_tokens_as_generate(model, runner, reference, policy):
    """Requests join and leave a shared, padded running set at different steps; at most 4 run at once."""
    engine, collector = new_engine(model, policy=policy)
    requests = [make(model, p, max_tokens=8 + 5 * i) for i, p in enumerate(PROMPTS)]
    assert_staggered_run_matches_generate(engine, collector, requests, runner, reference, gap_s=0.05)


def assert_staggered_run_matches_generate(engine: Engine, collector: Collector, requests: list[Request], runner,
                                          reference, gap_s: float) -> None:
    """Start the engine and submit the requests ``gap_s`` apart: each ends once, with generate()'s greedy tokens,
    and the executor is empty afterwards."""
    engine.start()
    for r in requests:
        engine.submit(r)
        time.sleep(gap_s)
    collector.wait([r.id for r in requests])
    engine.stop()
    for r in requests:
        assert collector.tokens[r.id] == reference(r.prompt_ids, r.sampling.max_tokens), r.prompt[:30]
        assert len(collector.finals[r.id]) == 1
    assert runner.kv_bytes() == 0 and runner.rows == []


def test_decode_groups_keep_greedy_tokens(hf_model, reference, monkeypatch):
    """The transformers executor: with groups made free, batches decode in separate groups that merge and
    shrink as rows come and go; no token may change."""
    model, runner = hf_model, hf_model.executor
    monkeypatch.setattr(runner, "group_cost_positions", 0)
    monkeypatch.setattr(runner, "max_decode_groups", 3)
    engine, collector = new_engine(model, max_num_seqs=6)
    groups_seen = []
    engine.core.emit = lambda events, emit=engine.core.emit: (groups_seen.append(len(runner.groups)), emit(events))[1]
    engine.start()
    requests = [make(model, p, max_tokens=6 + 4 * i) for i, p in enumerate(PROMPTS * 2)]
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
def test_a_small_kv_budget_is_never_exceeded(model, runner, reference, policy):
    """Mixed lengths through a budget that holds only a few of them at a time: admission waits for
    room instead of overrunning it, and every request still completes with the right tokens."""
    per_token = runner.kv_cost().bytes_per_token
    # about three long sequences with the slabs' spare room; paged KV has neither padding nor spare room, so
    # the same workload needs a smaller budget to press on it (the longest request takes 667 positions)
    budget = (800 if runner.page_size else 3 * (400 + 64)) * per_token
    engine, collector = new_engine(model, max_num_seqs=16, policy=policy, kv_cache_bytes=budget)
    sizes = [(PROMPTS[i % len(PROMPTS)] * (1 + i % 3), 4 + 3 * (i % 5)) for i in range(14)]
    requests = [make(model, p, max_tokens=n) for p, n in sizes]
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


@pytest.mark.parametrize("policy", POLICIES)
def test_prompts_prefilled_in_chunks_give_the_same_greedy_tokens_as_generate(model, runner, reference, policy):
    """A step computes at most 24 prompt tokens, so every prompt but the shortest is prefilled in chunks over
    several steps, each chunk in the same forward as the running rows' decode."""
    if not runner.unified_step:
        pytest.skip("the transformers executor prefills whole prompts")
    engine, collector = new_engine(model, policy=policy, max_prefill_tokens=24)
    requests = [make(model, p, max_tokens=6 + 3 * i) for i, p in enumerate(PROMPTS)]
    assert sum(r.prompt_len > 24 for r in requests) >= 3
    assert_staggered_run_matches_generate(engine, collector, requests, runner, reference, gap_s=0.02)


def test_a_long_prompt_goes_on_chunk_by_chunk_while_a_running_row_decodes_and_can_be_aborted(model, runner):
    """Driven step by step: the long prompt gets 16 of each step's 32 prompt tokens while another request waits
    (the waiting one gets the other 16), all of them once nothing waits; no token comes before its last chunk,
    and the row already running gets one token every step. Aborted half way, its pages go back."""
    if not runner.unified_step:
        pytest.skip("the transformers executor prefills whole prompts")
    engine, _ = new_engine(model, max_prefill_tokens=32)
    core = engine.core
    short, long, late = make(model, "x", max_tokens=100), make(model, PROMPTS[4], max_tokens=4), make(model, "y", max_tokens=100)
    assert long.prompt_len > 100
    core.add(short)
    core.step()  # short is prefilled alone and has its first token
    core.add(long)
    core.step()  # long's first chunk: the whole budget less short's nothing (short only decodes)
    assert long.prefilled == 32 and not long.output_ids and len(short.output_ids) == 2
    core.add(late)
    core.step()  # late waits: long takes half the budget, late joins with its one token
    assert long.prefilled == 48 and late.prefilled == late.prompt_len and len(late.output_ids) == 1
    core.step()
    assert long.prefilled == 80 and len(short.output_ids) == 4 and len(late.output_ids) == 2
    pages_before = runner.pool.used_pages
    core.abort(long.id, FinishReason.CANCELLED)
    core.step()
    assert long.finish_reason is FinishReason.CANCELLED and not long.output_ids and long.id not in runner.pool.tables
    assert runner.pool.used_pages < pages_before and len(short.output_ids) == 5
    core.shutdown()
    assert runner.kv_bytes() == 0


def test_prefill_padding_counts_the_rows_that_round_a_step_with_running_rows(model, runner):
    """The rows of zeros that round a forward to a familiar row count round the decode rows riding along too:
    an 80-token prompt alone needs none (80 is such a count), beside one running row it gets 15."""
    from bucketserve.executor.linear import padded_rows

    if not runner.unified_step or not runner.onednn:
        pytest.skip("only the paged executor's oneDNN forward pads, and only it runs one forward a step")
    assert padded_rows(80) == 80 and padded_rows(81) == 96
    engine, _ = new_engine(model)
    core = engine.core
    ids = model.tokenizer.encode(PROMPTS[4])[:80]
    alone = Request("", ids, SamplingParams(max_tokens=2, temperature=0.0))
    core.add(alone)
    core.step()
    assert engine.stats.prefill_padded_tokens == 0
    core.step()  # alone's last token: it leaves
    running, joining = make(model, "x", max_tokens=10), Request("", ids, SamplingParams(max_tokens=2, temperature=0.0))
    core.add(running)
    core.step()
    core.add(joining)
    core.step()  # 80 prompt tokens and 1 decode row in one forward of 96 rows
    assert engine.stats.prefill_padded_tokens == 15 and engine.stats.prefill_tokens == 80 + running.prompt_len + 95
    core.shutdown()


def test_a_request_larger_than_the_budget_fails_alone(model, runner):
    engine, collector = new_engine(model, kv_cache_bytes=100 * runner.kv_cost().bytes_per_token)
    big, small = make(model, PROMPTS[4], max_tokens=8), make(model, "x", max_tokens=4)
    engine.submit(big)
    engine.submit(small)
    engine.start()
    collector.wait([big.id, small.id])
    engine.stop()
    assert "more than the budget" in collector.finals[big.id][0].error
    assert collector.finals[small.id][0].finish_reason is FinishReason.LENGTH


def test_abort_frees_the_sequence(model, engine):
    long = make(model, PROMPTS[1], max_tokens=1000)
    engine.submit(long)
    wait_for(lambda: len(engine.collector.tokens[long.id]) >= 3)
    assert engine.executor.kv_bytes() > 0
    engine.abort(long.id)
    engine.collector.wait([long.id])
    assert engine.collector.finals[long.id][0].finish_reason is FinishReason.CANCELLED
    # stats follow the step that emitted the final
    wait_for(lambda: not engine.stats.running and not engine.stats.kv_bytes, timeout=10, what=str(engine.stats))


def test_abort_while_waiting_ends_the_request(model):
    engine, collector = new_engine(model, max_num_seqs=1)
    first, second = make(model, "a", max_tokens=200), make(model, "b", max_tokens=5)
    engine.submit(first)
    engine.submit(second)
    engine.abort(second.id)
    engine.start()
    collector.wait([second.id])
    assert collector.finals[second.id][0].finish_reason is FinishReason.CANCELLED and collector.tokens[second.id] == []
    engine.stop()
    assert collector.finals[first.id][0].error == "the model is shutting down"  # one final, even at shutdown


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(model, engine):
    alone = make(model, "Once upon a time", max_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    engine.submit(alone)
    engine.collector.wait([alone.id])
    crowd = [make(model, p, max_tokens=12, temperature=0.9, seed=i) for i, p in enumerate(PROMPTS[:3])]
    again = make(model, "Once upon a time", max_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    for r in [*crowd, again]:
        engine.submit(r)
    engine.collector.wait([r.id for r in [*crowd, again]])
    assert engine.collector.tokens[again.id] == engine.collector.tokens[alone.id]
    other = make(model, "Once upon a time", max_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=99)
    engine.submit(other)
    engine.collector.wait([other.id])
    assert engine.collector.tokens[other.id] != engine.collector.tokens[alone.id]


def test_max_tokens_bounds_length(model, engine):
    r = make(model, "Hello", max_tokens=6)
    engine.submit(r)
    engine.collector.wait([r.id])
    assert len(engine.collector.tokens[r.id]) == 6
    assert engine.collector.finals[r.id][0].finish_reason is FinishReason.LENGTH


def test_the_waiting_queue_is_bounded_and_frees_up_as_requests_run(model):
    engine, collector = new_engine(model, max_num_seqs=2, max_queue_size=3)
    burst = [make(model, p, max_tokens=4) for p in PROMPTS[:3]]
    for r in burst:
        assert not engine.queue_full()
        engine.submit(r)
    assert engine.waiting() == 3 and engine.queue_full()  # nothing admitted yet: the engine is not started
    engine.start()
    collector.wait([r.id for r in burst])
    assert engine.waiting() == 0 and not engine.queue_full()
    later = make(model, PROMPTS[3], max_tokens=4)
    engine.submit(later)
    collector.wait([later.id])
    engine.stop()
    assert all(len(collector.finals[r.id]) == 1 for r in [*burst, later])


def test_a_request_past_its_timeout_ends_waiting_or_running_and_frees_its_kv(model):
    engine, collector = new_engine(model, max_num_seqs=1)
    running = make(model, PROMPTS[1], max_tokens=2000)
    running.timeout_ms = 1500
    queued = make(model, "x", max_tokens=4)
    queued.timeout_ms = 300
    engine.submit(running)
    engine.submit(queued)
    engine.start()
    collector.wait([running.id, queued.id])
    [late], [expired] = collector.finals[running.id], collector.finals[queued.id]
    assert expired.finish_reason is FinishReason.DEADLINE and collector.tokens[queued.id] == []
    assert "timeout of 300 ms passed after 0 output tokens" in expired.error
    assert late.finish_reason is FinishReason.DEADLINE and 0 < len(collector.tokens[running.id]) < 2000
    assert "timeout of 1500 ms" in late.error
    wait_for(lambda: not engine.stats.kv_bytes, timeout=10)
    engine.stop()
    assert engine.stats.expired == 2


@pytest.mark.parametrize("slo_expiry", [0.0, 1.0])
def test_a_request_that_can_no_longer_get_its_first_token_in_time_is_ended(model, slo_expiry):
    engine, collector = new_engine(model, max_num_seqs=1, slo_expiry=slo_expiry)
    blocker = make(model, PROMPTS[0], max_tokens=60)
    hopeful = make(model, "x", max_tokens=4)
    hopeful = Request(hopeful.prompt, hopeful.prompt_ids, hopeful.sampling, slo_ms=50)
    engine.submit(blocker)
    engine.submit(hopeful)
    engine.start()
    collector.wait([blocker.id, hopeful.id])
    engine.stop()
    [final] = collector.finals[hopeful.id]
    if slo_expiry:
        assert final.finish_reason is FinishReason.DEADLINE and "past slo_ms 50 x slo_expiry 1" in final.error
    else:  # 0: late requests still run
        assert final.finish_reason is FinishReason.LENGTH and len(collector.tokens[hopeful.id]) == 4
    assert collector.finals[blocker.id][0].finish_reason is FinishReason.LENGTH


def test_loading_work_runs_on_a_thread_that_is_gone_after_it_returns():
    """Model loading and KV allocation run there, so the caller's thread keeps no OpenMP team beside the engine's."""
    from bucketserve.factory import on_passing_thread

    ran_on: list[threading.Thread] = []

    def work(x: int, *, y: int) -> int:
        ran_on.append(threading.current_thread())
        return x + y

    assert on_passing_thread(work, 1, y=2) == 3
    assert ran_on[0] is not threading.current_thread() and not ran_on[0].is_alive()

    def fails() -> None:
        raise MemoryError("no room for the KV pool")

    with pytest.raises(MemoryError, match="no room"):
        on_passing_thread(fails)
